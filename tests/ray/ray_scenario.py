"""The Ray executor's acceptance scenarios, run by test_ray_executor.py inside a network namespace.

    unshare -n -- sh -c 'ip link set lo up && exec python ray_scenario.py WORKDIR'

A real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head with no
CPUs, builder nodes added and removed) on loopback only. Each stream of the
Ray executor is compared, batch by batch (header and payload bytes), with the
same stream built by ``ThreadExecutor`` in this process. Prints ``OK`` last.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(TESTS / "pipeline")]

from pipeline_data import make_image_folder  # noqa: E402

from batchwire import wire  # noqa: E402
from batchwire.server._tasks import ExecutorFailed, TaskTimedOut  # noqa: E402
from batchwire.server.config import load_config  # noqa: E402
from batchwire.server.inprocess import ThreadExecutor  # noqa: E402
from batchwire.server.samplers import BatchPlan  # noqa: E402
from batchwire.server.stream import BatchStream, StreamHooks, StreamLimits, StreamStopped  # noqa: E402
from batchwire.v1 import batchwire_pb2 as pb  # noqa: E402

TIMEOUT = 6.0

CONFIG = f"""
[server]
python_path = ["{TESTS / "server"}", "{TESTS / "pipeline"}"]
task_timeout_seconds = {TIMEOUT}
executor = "ray"
workers = 2

[datasets.images]
source = "image_folder"
root = "images"
transforms.image = [
  "ToTensor",
  {{ name = "RandomCrop", size = 16, padding = 2 }},
  {{ name = "RandomHorizontalFlip", p = 0.5 }},
  {{ name = "Normalize", mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }},
]

[datasets.small]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = 300 }}

[datasets.slow]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = 240, size = 1024, delay = 0.02 }}

[datasets.seqs]
source = "python"
factory = "pipeline_data:variable_sequences"
kwargs = {{ length = 97 }}
collate = {{ kind = "pad", fields = ["tokens"], padding_value = -1 }}
sampler = {{ kind = "dynamic", length_field = "tokens", max_tokens = 40 }}

[datasets.noisy]
source = "python"
factory = "pipeline_data:slow_range"
kwargs = {{ length = 60, delay = 0.0 }}
transforms = [{{ name = "pipeline_data:add_noise" }}]
collate = "pipeline_data:sum_collate"

[datasets.weighted]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = 300 }}
sampler = {{ kind = "weighted", weights = "weights.npy", num_samples = 120 }}

[datasets.subset]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = 300 }}
sampler = {{ kind = "subset", indices = "subset.npy" }}

[datasets.hangs]
source = "python"
factory = "pool_data:hangs_at"
kwargs = {{ length = 64, hang = 21 }}
"""


def batches_of(messages: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Each batch's header and payload bytes, whatever the chunking and packing."""
    out: list[tuple[bytes, bytearray]] = []
    for message in messages:
        chunk = wire.parse_chunk(message)
        for part in (chunk, *chunk.packed):
            if part.header is not None:
                header = pb.BatchHeader()
                header.CopyFrom(part.header)
                # Measurements of this run (issue 16's data-wait), not the batch's content.
                header.ClearField("build_seconds")
                header.ClearField("wait_seconds")
                out.append((header.SerializeToString(), bytearray()))
            out[-1][1].extend(part.data)
    return [(header, bytes(payload)) for header, payload in out]


async def stream(executor, dataset, plan, *, per_message=1, batch_bytes=0, on_message=None):
    messages: list[bytes] = []

    async def write(message: bytes) -> None:
        messages.append(bytes(message))
        if on_message is not None:
            on_message(len(messages))
        await asyncio.sleep(0)

    limits = StreamLimits(
        prefetch_batches=4, chunk_bytes=1 << 20, max_batch_bytes=1 << 30, per_message=per_message
    )
    run = BatchStream(
        executor,
        dataset,
        plan,
        range(len(plan)),
        limits,
        StreamHooks(write=write),
        batch_bytes=batch_bytes,
    )
    await run.run()
    return messages


def shuffled(length: int, batch_size: int, seed: int) -> BatchPlan:
    order = np.random.default_rng(seed).permutation(length)
    return BatchPlan.fixed(order, batch_size, False, seed=seed, epoch=2)


def check(name: str, got: list[bytes], want: list[bytes]) -> None:
    got_batches, want_batches = batches_of(got), batches_of(want)
    assert len(got_batches) == len(want_batches), (name, len(got_batches), len(want_batches))
    assert got_batches == want_batches, f"{name}: the ray stream differs"
    print(f"{name}: {len(got_batches)} batches byte-identical", flush=True)


def served_through_grpc(config, reference) -> None:
    import grpc

    from batchwire.server.app import BatchwireServer
    from batchwire.server.requests import plan_stream

    server = BatchwireServer(config, host="127.0.0.1", port=0)
    server.start()
    try:
        request = pb.StreamBatchesRequest(
            dataset="images", batch_size=4, shuffle=True, seed=5, epoch=1, world_size=1
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_stream(
                "/batchwire.v1.BatchService/StreamBatches",
                request_serializer=pb.StreamBatchesRequest.SerializeToString,
                response_deserializer=None,
            )
            got = list(call(request, timeout=120))
        plan = plan_stream(request, length=29, max_batch_size=65536).plan
        want = asyncio.run(stream(reference, "images", plan))
        check("images through the gRPC server", got, want)
    finally:
        server.stop(0)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from batchwire.server.ray_executor import RayExecutor

    work = Path(sys.argv[1])
    make_image_folder(work / "images", {"cat": 13, "dog": 7, "emu": 9})
    np.save(work / "weights.npy", np.linspace(0.1, 2.0, 300))
    np.save(work / "subset.npy", np.arange(3, 300, 7))
    (work / "ray.toml").write_text(CONFIG)
    config = load_config(work / "ray.toml")
    reference = ThreadExecutor(config, threads=2)

    store = 80 << 20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": store},
    )
    builders = cluster.add_node(num_cpus=2, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)

    # 1. Every stream equal to the in-process executor's (random augmentation, grouping).
    executor = RayExecutor(config, 2)
    executor.start()
    cases = [
        ("images", shuffled(29, 4, 7), 1, 0),
        ("images", shuffled(29, 5, 8), 4, 3 * 16 * 16 * 4),
        ("small", shuffled(300, 8, 9), 8, 64),
    ]
    # Plans as the server makes them, for each sampler kind and collate.
    from batchwire.server.registry import DatasetRegistry
    from batchwire.server.requests import plan_stream

    registry = DatasetRegistry(config)
    for dataset, kind, extra in [
        ("seqs", "", {}),  # the dataset's own: dynamic, pad collate
        ("noisy", "distributed", {"rank": 1, "world_size": 3}),  # import-path collate
        ("small", "random", {}),
        ("weighted", "", {}),  # the dataset's own: weighted, with replacement
        ("subset", "", {"rank": 1, "world_size": 2}),  # the dataset's own: subset
        ("images", "distributed", {"rank": 0, "world_size": 2}),
    ]:
        request = pb.StreamBatchesRequest(
            dataset=dataset, batch_size=6, shuffle=True, seed=11, epoch=3, world_size=1
        )
        request.sampler.kind = kind
        for key, value in extra.items():
            setattr(request, key, value)
        entry = registry.get(dataset)
        plan = plan_stream(
            request, length=entry.length, max_batch_size=65536, sampler=entry.dataset.sampler
        ).plan
        cases.append((dataset, plan, 4, 64))
        print(f"{dataset}: sampler {kind or 'configured'}, {len(plan)} batches", flush=True)
    for dataset, plan, per_message, batch_bytes in cases:
        got = asyncio.run(
            stream(executor, dataset, plan, per_message=per_message, batch_bytes=batch_bytes)
        )
        want = asyncio.run(
            stream(reference, dataset, plan, per_message=per_message, batch_bytes=batch_bytes)
        )
        check(f"{dataset} ({len(plan)} batches) per_message={per_message}", got, want)

    # 2. A stuck sample: that stream ends naming dataset, sample and timeout; another goes on.
    async def stuck_and_other():
        hang = asyncio.create_task(stream(executor, "hangs", shuffled(64, 8, 0)))
        other = asyncio.create_task(stream(executor, "small", shuffled(300, 8, 1)))
        results = await asyncio.gather(hang, other, return_exceptions=True)
        return results

    started = time.monotonic()
    hung, other = asyncio.run(stuck_and_other())
    assert isinstance(hung, StreamStopped), hung
    assert isinstance(hung.failure, TaskTimedOut), hung.failure
    message = str(hung.failure)
    assert "dataset 'hangs'" in message and "sample index" in message, message
    assert f"task_timeout_seconds={TIMEOUT:g}" in message, message
    want = asyncio.run(stream(reference, "small", shuffled(300, 8, 1)))
    check("the stream beside the stuck one", other, want)
    print(f"stuck: {message} ({time.monotonic() - started:.1f} s)", flush=True)
    executor.close()

    # The real server with executor = "ray", over gRPC on 127.0.0.1.
    served_through_grpc(config, reference)

    # 3. The node running the actors is removed mid-epoch: the stream completes, exactly once.
    executor = RayExecutor(config, 2)
    executor.start()
    cluster.add_node(num_cpus=2, object_store_memory=store)  # where the new actors go
    plan = shuffled(240, 8, 3)
    removed = []

    def remove_after(count: int) -> None:
        if count == 6 and not removed:
            removed.append(time.monotonic())
            cluster.remove_node(builders)
            print("removed the builders' node after 6 batches", flush=True)

    got = asyncio.run(stream(executor, "slow", plan, on_message=remove_after))
    assert removed, "the node was never removed"
    assert executor.replaced >= 1, executor.replaced
    want = asyncio.run(stream(reference, "slow", plan))
    check("slow, its node removed mid-epoch", got, want)
    executor.close()

    # 4. Every builder node removed, none to take its place: the executor reports itself
    # failed (health NOT_SERVING) and the stream ends UNAVAILABLE instead of waiting
    # forever; a node that joins makes it healthy again and streams flow.
    builders = cluster.list_all_nodes()[-1]
    executor = RayExecutor(config, 2)
    executor.place_seconds = 3.0
    heard: list[str | None] = []
    executor.on_health_change(heard.append)
    executor.start()
    lost = []

    def remove_all(count: int) -> None:
        if count == 4 and not lost:
            lost.append(count)
            cluster.remove_node(builders)

    try:
        asyncio.run(stream(executor, "slow", plan, on_message=remove_all))
        raise AssertionError("the stream went on without any actor")
    except StreamStopped as stopped:
        assert isinstance(stopped.failure, ExecutorFailed), stopped.failure
        print(f"no actors: the stream ended: {stopped.failure}", flush=True)
    # Health heard it (an actor may already be placed again by now: not asserted here).
    # The listener runs just after the state changes, maybe after the stream saw it.
    for _ in range(50):  # bounds a hang
        if any(h and "no Ray actor is alive" in h for h in heard):
            break
        time.sleep(0.1)
    assert heard[0] is None and any(h and "no Ray actor is alive" in h for h in heard), heard
    cluster.add_node(num_cpus=2, object_store_memory=store)
    for _ in range(600):  # bounds a hang: until an actor is placed on the new node
        if executor.failure is None:
            break
        time.sleep(0.1)
    for _ in range(50):  # the listener runs just after the state changes
        if heard[-1] is None:
            break
        time.sleep(0.1)
    assert executor.failure is None and heard[-1] is None, heard
    small = shuffled(300, 8, 4)
    got = asyncio.run(stream(executor, "small", small))
    check("small, after the cluster came back", got, asyncio.run(stream(reference, "small", small)))
    executor.close()
    reference.close()
    ray.shutdown()
    cluster.shutdown()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
