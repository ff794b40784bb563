"""The server's half of shared-memory delivery without a server: offers, windows, release, give-away.

The client side here is ``batchwire.client._shm.PayloadMapper``, the one a real
trainer uses; see tests/client/test_client_shm.py for the whole path.
"""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import pytest
import torch

from batchwire.client import _shm
from batchwire.client._shm import PayloadMapper
from batchwire.server import shm_delivery
from batchwire.server._payloads import PayloadFiles
from batchwire.v1 import batchwire_pb2 as pb

SIZE = 4096


def payload(files: PayloadFiles, fill: int) -> memoryview:
    path = files.take()
    Path(path).write_bytes(bytes([fill]) * SIZE)
    return files.open(path, SIZE)


def test_offer_is_private_and_proves_only_its_nonce(tmp_path: Path):
    shm = shm_delivery.SharedMemory(str(tmp_path))
    offer = shm.offer()
    assert stat.S_IMODE(os.stat(offer.path).st_mode) == 0o600
    nonce = Path(offer.path).read_bytes()
    assert len(nonce) == offer.size == shm_delivery.NONCE_BYTES
    assert not shm.accepts(b"") and not shm.accepts(b"x" * len(nonce))
    assert shm.accepts(nonce) and not os.path.exists(offer.path)  # read: removed
    assert shm.accepts(nonce)  # other streams of the same client
    shm.close()


def test_window_release_recycling_and_give_away(tmp_path: Path):
    files = PayloadFiles(str(tmp_path), object())
    shm = shm_delivery.SharedMemory(str(tmp_path))
    stream = shm.stream(window=2, window_bytes=SIZE)
    mapper = PayloadMapper()
    header = pb.BatchHeader(payload_size=SIZE)

    def share(fill: int) -> pb.SharedMemoryPayload:
        view = payload(files, fill)
        assert stream.shareable(view) and stream.has_room(SIZE)
        return pb.SharedMemoryPayload.FromString(stream.handle(view))

    sent = [share(0), share(1)]
    assert stream.must_wait(SIZE)  # window=2 sent, none mapped yet
    kept = [mapper(handle, header) for handle in sent]
    assert not stream.must_wait(SIZE)
    sent += [share(2), share(3)]
    kept += [mapper(handle, header) for handle in sent[2:]]
    assert [bytes(view[:1]) for view in kept] == [b"\0", b"\1", b"\2", b"\3"]
    view = payload(files, 4)
    assert not stream.has_room(SIZE)  # the client holds 2 * window: the next goes as bytes
    # The client lets go of batch 1 (not the oldest): the full scan finds it.
    del kept[1]
    gc.collect()
    assert stream.has_room(SIZE)
    sent.append(pb.SharedMemoryPayload.FromString(stream.handle(view)))
    kept.append(mapper(sent[-1], header))
    del view
    gc.collect()
    assert os.path.exists(sent[1].path)  # released: kept for the pool to write over
    # The stream ends while the client holds 4: those are given away, never recycled.
    stream.close()
    kept.clear()
    mapper.close()
    gc.collect()
    assert not [h.path for h in sent if h is not sent[1] and os.path.exists(h.path)]  # unlinked
    files.trim()
    assert not os.listdir(tmp_path)
    shm.close()


def test_group_makes_objects_0640(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("changing an object's group needs root or membership")
    shm = shm_delivery.SharedMemory(str(tmp_path), "nogroup")
    offer = shm.offer()
    info = os.stat(offer.path)
    assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == 65534
    shm.close()


@pytest.mark.parametrize("pagemap", [True, False], ids=["pagemap", "no pagemap"])
def test_a_kept_mapping_shows_a_recycled_file_and_never_a_loop_s_writes(
    tmp_path: Path, monkeypatch, pagemap: bool
):
    """The client keeps its mapping of a payload file for the file's next batch; pages a
    training loop wrote to are private copies of old bytes, so then it maps the file anew.
    Where /proc cannot say which pages were written, a mapping is used again only while a
    batch of it is held."""
    if not pagemap:
        monkeypatch.setattr(_shm, "_open_pagemap", lambda: None)
    files = PayloadFiles(str(tmp_path), object())
    shm = shm_delivery.SharedMemory(str(tmp_path))
    stream = shm.stream(window=4, window_bytes=SIZE)
    mapper = PayloadMapper()
    header = pb.BatchHeader(payload_size=SIZE)

    def batch(path: str, fill: int) -> torch.Tensor:
        with open(path, "r+b" if os.path.exists(path) else "wb") as out:  # in place, as workers
            out.write(bytes([fill]) * SIZE)
        view = files.open(path, SIZE)
        assert stream.shareable(view) and stream.has_room(SIZE, 1)
        handle = pb.SharedMemoryPayload.FromString(stream.handle(view))
        del view
        return torch.frombuffer(mapper(handle, header), dtype=torch.uint8)

    def recycled(path: str) -> str:
        gc.collect()  # the batch's finalizer tells the server; the server's mapping goes
        assert not stream.must_wait(SIZE)  # reads the release board: the hold ends
        gc.collect()
        assert files.take() == path  # the server writes its next batch over the same file
        return path

    path = files.take()
    first = batch(path, 1)
    assert first.eq(1).all()
    mapping = mapper._kept[path].memory
    del first
    second = batch(recycled(path), 2)
    assert second.eq(2).all()
    assert (mapper._kept[path].memory is mapping) == pagemap  # used again: no new mapping
    mapping = mapper._kept[path].memory
    second.fill_(9)  # a loop that normalises in place: copy-on-write pages of old bytes
    del second
    third = batch(recycled(path), 3)
    assert third.eq(3).all()  # the new bytes, not the loop's 9s
    assert mapper._kept[path].memory is not mapping  # mapped anew
    del third
    _ends_clean(stream, mapper, files, shm, tmp_path)


def test_a_client_holds_a_file_s_batches_until_its_last_so_the_stream_holds_a_task_more(
    tmp_path: Path,
):
    files = PayloadFiles(str(tmp_path), object())
    shm = shm_delivery.SharedMemory(str(tmp_path))
    stream = shm.stream(window=2, window_bytes=SIZE)
    mapper = PayloadMapper()
    header = pb.BatchHeader(payload_size=SIZE)
    kept = []
    for fill in range(4):  # mapped, none released: 2 * window held
        view = payload(files, fill)
        assert stream.shareable(view) and stream.has_room(SIZE, 1)
        kept.append(mapper(pb.SharedMemoryPayload.FromString(stream.handle(view)), header))
        del view
    assert not stream.has_room(SIZE, 1)  # one batch per file: the next goes as bytes
    assert stream.has_room(SIZE, 3)  # three per file: the client lets go of them together
    kept.clear()
    _ends_clean(stream, mapper, files, shm, tmp_path)


def test_a_loop_s_write_to_one_batch_of_a_file_never_shows_in_a_later_batch_of_it(
    tmp_path: Path,
):
    """Two batches share a file; the loop writes in place to the second only. Once the
    server writes the next task over that file, no batch of it may show the old write:
    the first is mapped from a clean region, the second while the first is held."""
    files = PayloadFiles(str(tmp_path), object())
    shm = shm_delivery.SharedMemory(str(tmp_path))
    stream = shm.stream(window=4, window_bytes=SIZE)
    mapper = PayloadMapper()
    header = pb.BatchHeader(payload_size=SIZE)

    def task(path: str, fills: tuple[int, int]) -> list[torch.Tensor]:
        with open(path, "r+b" if os.path.exists(path) else "wb") as out:  # in place, as workers
            out.write(bytes([fills[0]]) * SIZE + bytes([fills[1]]) * SIZE)
        view = files.open(path, 2 * SIZE)
        handles = []
        for part in (view[:SIZE], view[SIZE:]):
            assert stream.shareable(part) and stream.has_room(SIZE, 2)
            handles.append(pb.SharedMemoryPayload.FromString(stream.handle(part)))
        del view, part
        return [torch.frombuffer(mapper(h, header), dtype=torch.uint8) for h in handles]

    path = files.take()
    first, second = task(path, (1, 2))
    second.fill_(0xEE)  # copy-on-write pages in the second batch only
    del first, second
    gc.collect()
    assert not stream.must_wait(SIZE)  # both released: the server's hold ends
    gc.collect()
    assert files.take() == path
    third, fourth = task(path, (3, 4))
    assert third.eq(3).all()
    assert fourth.eq(4).all()  # not the loop's 0xEE
    del third, fourth
    _ends_clean(stream, mapper, files, shm, tmp_path)


def _ends_clean(stream, mapper: PayloadMapper, files: PayloadFiles, shm, tmp_path: Path) -> None:
    """The stream and the client let go: no object is left in the shared-memory folder."""
    stream.close()
    mapper.close()
    gc.collect()
    files.trim()
    assert not os.listdir(tmp_path)
    shm.close()
