"""DevicePrefetcher: the same read-ahead on every device; pinned, reused, overlapped copies with CUDA."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, namedtuple

import pytest
import torch
from _serverproc import ServerProcess
from conftest import assert_same_batch

from batchwire.client import DevicePrefetcher, RemoteDataset, _prefetch
from batchwire.client._prefetch import flatten

Pair = namedtuple("Pair", ["x", "y"])

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


def nested_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(4, 3, 8, 8, generator=g),
        "meta": [torch.arange(4) + seed, (torch.ones(2, dtype=torch.uint8), "tag")],
        "pair": Pair(torch.randn(4, generator=g, dtype=torch.float64), seed),
        "ordered": OrderedDict(b=torch.zeros(1), a=torch.tensor(seed)),
    }


# -- structure (no device needed) ------------------------------------------------


def test_flatten_and_rebuild_keep_the_structure():
    batch = nested_batch(3)
    leaves, rebuild = flatten(batch)
    assert sum(isinstance(leaf, torch.Tensor) for leaf in leaves) == 6
    assert [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)] == ["tag", 3]
    rebuilt = rebuild(leaves)
    assert_same_batch(rebuilt["image"], batch["image"])
    assert type(rebuilt["pair"]) is Pair and rebuilt["pair"].y == 3
    assert type(rebuilt["ordered"]) is OrderedDict and list(rebuilt["ordered"]) == ["b", "a"]
    assert type(rebuilt["meta"]) is list and type(rebuilt["meta"][1]) is tuple
    assert rebuilt["meta"][1][1] == "tag"
    doubled = rebuild([leaf * 2 if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])
    assert torch.equal(doubled["meta"][0], batch["meta"][0] * 2)
    assert torch.equal(doubled["ordered"]["a"], torch.tensor(6))


def test_a_bare_tensor_is_a_batch_too():
    tensor = torch.arange(3)
    leaves, rebuild = flatten(tensor)
    assert leaves == [tensor] and rebuild([tensor + 1]).tolist() == [1, 2, 3]


# -- without CUDA ------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_a_cuda_device_is_refused():
    with pytest.raises(RuntimeError, match=r"device 'cuda' needs CUDA.*cpu_fallback=True"):
        DevicePrefetcher([nested_batch(0)], "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_the_cpu_fallback_is_asked_for_and_logged_once(caplog):
    _prefetch._told_no_cuda.clear()
    batches = [nested_batch(i) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="batchwire.client"):
        first = DevicePrefetcher(batches, "cuda", cpu_fallback=True)
        second = DevicePrefetcher(batches, "cuda:0", depth=3, cpu_fallback=True)
    assert first.device == second.device == torch.device("cpu")
    assert all(a is b for a, b in zip(first, batches, strict=True))  # the very same objects
    assert all(a is b for a, b in zip(second, batches, strict=True))
    told = [r for r in caplog.records if "DevicePrefetcher" in r.getMessage()]
    assert len(told) == 1
    assert "CUDA is not available" in told[0].getMessage()
    assert told[0].levelno == logging.WARNING


def test_a_cpu_device_passes_through(caplog):
    batches = [nested_batch(i) for i in range(2)]
    prefetcher = DevicePrefetcher(batches, torch.device("cpu"))
    assert not prefetcher.enabled
    assert len(prefetcher) == 2
    assert all(a is b for a, b in zip(prefetcher, batches, strict=True))
    assert prefetcher.pinned_bytes == 0


def test_prefetching_a_remote_dataset_yields_its_batches(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "tuple", batch_size=8, shuffle=True)
    expected = list(RemoteDataset(core_server.target, "tuple", batch_size=8, shuffle=True))
    got = list(DevicePrefetcher(ds, "cuda" if torch.cuda.is_available() else "cpu"))
    assert len(got) == len(expected) == 7
    for a, e in zip(got, expected, strict=True):
        assert_same_batch([t.cpu() if isinstance(t, torch.Tensor) else t for t in a[:2]], e[:2])


def test_depth_is_checked():
    with pytest.raises(ValueError, match="depth should be a positive integer, but got depth=0"):
        DevicePrefetcher([], "cuda", depth=0)


# -- with CUDA -----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_values_and_structure_arrive_on_the_device(depth):
    batches = [nested_batch(i) for i in range(9)]
    prefetcher = DevicePrefetcher(batches, "cuda", depth=depth)
    for got, sent in zip(prefetcher, batches, strict=True):
        assert got["image"].is_cuda and got["pair"].x.is_cuda and got["ordered"]["a"].is_cuda
        cpu = flatten(got)[1](
            [v.cpu() if isinstance(v, torch.Tensor) else v for v in flatten(got)[0]]
        )
        assert_same_batch(cpu["image"], sent["image"])
        assert_same_batch(cpu["meta"][0], sent["meta"][0])
        assert cpu["meta"][1][1] == "tag" and cpu["pair"].y == sent["pair"].y
        assert_same_batch(cpu["ordered"]["a"], sent["ordered"]["a"])


@needs_cuda
def test_pinned_buffers_are_allocated_once_per_slot_and_reused():
    depth, tensors_per_batch = 2, 6
    prefetcher = DevicePrefetcher([nested_batch(i) for i in range(20)], "cuda", depth=depth)
    for _ in prefetcher:
        pass
    assert prefetcher.pinned_allocations == depth * tensors_per_batch
    held = prefetcher.pinned_bytes
    assert held == depth * sum(
        t.numel() * t.element_size()
        for t in flatten(nested_batch(0))[0]
        if isinstance(t, torch.Tensor)
    )
    for _ in prefetcher:  # a second pass reuses the same buffers
        pass
    assert prefetcher.pinned_allocations == depth * tensors_per_batch
    assert all(b.is_pinned() for slot in prefetcher._slots for b in slot.buffers)
    # A shape change re-allocates only what changed.
    changed = [{"x": torch.ones(5)}, {"x": torch.ones(6)}, {"x": torch.ones(6)}]
    small = DevicePrefetcher(changed, "cuda", depth=1)
    assert [b["x"].numel() for b in small] == [5, 6, 6]
    assert small.pinned_allocations == 2


@needs_cuda
def test_a_pending_copy_is_never_overwritten():
    # The source rewrites one CPU tensor in place for every batch, and the consumer
    # is slow: a buffer reused before its copy finished would show another value.
    source_tensor = torch.empty(1 << 22)

    def batches():
        for i in range(12):
            source_tensor.fill_(i)
            yield {"x": source_tensor}

    for i, batch in enumerate(DevicePrefetcher(batches(), "cuda", depth=2)):
        torch.cuda._sleep(2_000_000)  # a long kernel on the consumer stream
        assert batch["x"].min().item() == batch["x"].max().item() == i


@needs_cuda
def test_copies_overlap_with_compute():
    n, numel = 12, 16 << 20  # 64 MiB per batch
    batches = [{"x": torch.full((numel,), float(i))} for i in range(n)]
    prefetcher = DevicePrefetcher(batches, "cuda", depth=2)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(loop) -> float:
        torch.cuda.synchronize()
        began = time.perf_counter()
        loop()
        torch.cuda.synchronize()
        return time.perf_counter() - began

    def copy_only():
        for _ in prefetcher:
            pass

    copy_only()  # allocates the pinned buffers; every timed pass below reuses them
    copy_seconds = timed(copy_only) / n
    # Calibrate a kernel that lasts about as long as one batch's copy.
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(1_000_000 * copy_seconds * 1000 / start.elapsed_time(end))

    def compute_only():
        for _ in range(n):
            torch.cuda._sleep(cycles)

    def both():
        for i, batch in enumerate(prefetcher):
            torch.cuda._sleep(cycles)  # the training step, on the caller's stream
            batch["x"].add_(1)
            if i == n - 1:
                assert batch["x"][0].item() == n  # the last batch's values, after the step

    serial = timed(copy_only) + timed(compute_only)
    overlapped = timed(both)
    assert prefetcher.pinned_allocations == 2
    assert overlapped < 0.8 * serial, (
        f"no overlap: copy and compute together took {overlapped:.3f}s; "
        f"copy alone then compute alone {serial:.3f}s"
    )
