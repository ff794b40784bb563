"""Issue 13 (1-4): replicas behind client-side round_robin, with real `batchwire serve` processes.

Three replicas listen on 127.0.0.1, .2 and .3 (all of 127/8 is loopback on
Linux), one port, one worker each, as pods of a Deployment would; a list
target names them, and a ``dns://`` target names them through a DNS server of
the test's own on loopback (``dns_stub``), which a channel resolves again when
a connection ends: how a replica that joins is found (acceptance 3). Every
check compares batches with a local DataLoader, tensor for tensor.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sample_datasets
import torch
from _serverproc import free_port
from conftest import TESTS_DIR, assert_same_batch
from dns_stub import DnsStub
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, WeightedRandomSampler

from batchwire.client import BatchClient, FingerprintMismatch, RemoteDataset, ServerError
from batchwire.server.launch import ServeProcess as ServerProcess
from batchwire.server.pipeline import SamplerConfig
from batchwire.server.requests import plan_stream
from batchwire.v1 import batchwire_pb2 as pb

LENGTH = 103  # not a multiple of the batch size
SLOW = 300  # items of the slow dataset (20 ms each): an epoch lasts seconds
CONFIG = """
[server]
python_path = ["{tests}", "{tests}/server"]
summary_seconds = 0
grace_seconds = {grace}
max_connection_age_seconds = 5
max_connection_age_grace_seconds = 1

[datasets.items]
source = "python"
factory = "sample_datasets:indexed_dict"
kwargs = {{ length = {length} }}
{sampler}

[datasets.slow]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = {slow}, size = 16, delay = 0.02 }}
"""
SAMPLER = 'sampler = { weights = "weights.npy", indices = "subset.npy", lengths = "lengths.npy" }'
WEIGHTS = np.linspace(0.1, 2.0, LENGTH)
SUBSET = np.arange(2, LENGTH, 3)
LENGTHS = np.arange(LENGTH) % 7 + 1
SPECS = {
    "distributed": {},
    "random": {"num_samples": 90},
    "weighted": {"num_samples": 90},
    "subset": {},
    "dynamic": {"max_tokens": 24},
}
NAME = "replicas.test"


def answering(client: BatchClient, replicas: set[str]) -> None:
    """Returns once each of ``replicas`` answered a call of ``client`` (and no other did)."""
    seen: set[str] = set()
    for _ in range(400):  # bounds a hang: a new channel connects to the replicas one by one
        seen.add(client.describe("items").replica)
        assert seen <= replicas, seen
        if seen == replicas:
            return
        time.sleep(0.02)
    raise AssertionError(f"only {sorted(seen)} of {sorted(replicas)} answered")


def stream_starts(server: ServerProcess) -> int:
    """Streams the replica opened (its log's "stream start" lines)."""
    return sum("stream start" in line for line in list(server.output))


class Replicas:
    """Replicas of one config on 127.0.0.x, one shared port, and a DNS name for them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.config = folder / "replicas.toml"
        self.servers: list[ServerProcess] = []
        self.dns = DnsStub(NAME, [])

    def start(self, hosts: list[str], config: Path | None = None) -> list[ServerProcess]:
        """Starts one server per host, together; the DNS name lists them once they serve."""
        servers = [
            ServerProcess(config or self.config, port=self.port, workers=1, host=host)
            for host in hosts
        ]
        errors: list[BaseException] = []

        def start(server: ServerProcess) -> None:
            try:
                server.start()
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.servers += servers
        if errors:
            raise errors[0]
        if config is None:
            self.dns.addresses += hosts
        return servers

    @property
    def targets(self) -> list[str]:
        return [server.target for server in self.servers[:3]]

    def close(self) -> None:
        stopping = [threading.Thread(target=server.stop) for server in self.servers]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        self.dns.close()


def write_config(
    path: Path, *, length: int = LENGTH, sampler: str = SAMPLER, grace: float = 1
) -> Path:
    text = CONFIG.format(tests=TESTS_DIR, length=length, slow=SLOW, sampler=sampler, grace=grace)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    folder = tmp_path_factory.mktemp("replicas")
    np.save(folder / "weights.npy", WEIGHTS)
    np.save(folder / "subset.npy", SUBSET)
    np.save(folder / "lengths.npy", LENGTHS)
    write_config(folder / "replicas.toml")
    group = Replicas(folder)
    try:
        group.start(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        yield group
    finally:
        group.close()


# -- the local reference ------------------------------------------------------------------


def local_batches(kind: str, *, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list:
    """What a local DataLoader yields for the request (one rank); torch's own samplers
    where torch has one, else the sampler's plan computed in this process."""
    dataset = sample_datasets.indexed_dict(LENGTH)
    generator = torch.Generator().manual_seed(seed + epoch)
    spec = SPECS[kind]
    if kind == "distributed":
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
    elif kind == "random":
        order = torch.randint(LENGTH, (spec["num_samples"],), generator=generator).tolist()
    elif kind == "weighted":
        weights = WEIGHTS.tolist()
        order = list(WeightedRandomSampler(weights, spec["num_samples"], generator=generator))
    elif kind == "subset":
        sampler = DistributedSampler(range(len(SUBSET)), num_replicas=1, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        order = SUBSET[list(sampler)].tolist()
    else:  # dynamic: batches filled up to a token budget; no torch sampler does that
        request = pb.StreamBatchesRequest(
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            world_size=1,
            drop_last=drop_last,
            sampler=pb.SamplerSpec(kind=kind, **spec),
        )
        plan = plan_stream(
            request, length=LENGTH, max_batch_size=1024, sampler=SamplerConfig(lengths=LENGTHS)
        ).plan
        return list(DataLoader(dataset, batch_sampler=[plan[b].tolist() for b in range(len(plan))]))
    return list(DataLoader(dataset, batch_sampler=BatchSampler(order, batch_size, drop_last)))


def slow_batches(*, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    dataset = [torch.full((16,), i, dtype=torch.int64) for i in range(SLOW)]  # stream_data's items
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler))


def assert_batches(actual: list[Any], expected: list[Any], where: str) -> None:
    assert len(actual) == len(expected), f"{where}: {len(actual)} batches, not {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_same_batch(a, e, f"{where} batch {i}")


# -- 1. three replicas, every sampler kind ---------------------------------------------------


def test_targets_name_replicas_as_a_list_a_string_or_a_grpc_name(replicas):
    port = replicas.port
    forms = [
        replicas.targets,  # a Python list
        ",".join(replicas.targets),  # BATCHWIRE_TARGET style
        f"ipv4:127.0.0.1:{port},127.0.0.2:{port},127.0.0.3:{port}",
        replicas.dns.target(port),
    ]
    for target in forms:
        answering(BatchClient(target), {f"127.0.0.{i}:{port}" for i in (1, 2, 3)})


def test_every_cli_command_takes_replicas_from_batchwire_target(replicas, monkeypatch, capsys):
    from batchwire import cli

    monkeypatch.setenv("BATCHWIRE_TARGET", ",".join(replicas.targets))
    assert cli.main(["ls"]) == 0
    listed = capsys.readouterr().out
    assert "items" in listed and "slow" in listed, listed
    assert cli.main(["health"]) == 0  # each replica's, all SERVING
    assert capsys.readouterr().out.splitlines() == [f"{t}: SERVING" for t in replicas.targets]


def test_three_replicas_stream_what_one_server_and_a_local_dataloader_do(replicas):
    before = [stream_starts(server) for server in replicas.servers[:3]]
    for kind in sorted(SPECS):
        for drop_last in (False, True):
            fields = dict(batch_size=8, shuffle=True, seed=7, drop_last=drop_last)
            spread = RemoteDataset(
                replicas.targets,
                "items",
                sampler={"kind": kind, **SPECS[kind]},
                streams=3,
                **fields,
            )
            one = RemoteDataset(
                replicas.targets[0], "items", sampler={"kind": kind, **SPECS[kind]}, **fields
            )
            for ds in (spread, one):
                ds.set_epoch(2)
            expected = local_batches(kind, batch_size=8, seed=7, epoch=2, drop_last=drop_last)
            where = f"{kind} drop_last={drop_last}"
            assert_batches(list(spread), expected, f"{where}, 3 replicas")
            assert_batches(list(one), expected, f"{where}, one server")
    served = [
        stream_starts(server) - b for server, b in zip(replicas.servers[:3], before, strict=True)
    ]
    assert all(count > 0 for count in served), f"streams per replica: {served}"


def test_dataloader_workers_share_the_replicas_and_one_fingerprint(replicas):
    ds = RemoteDataset(replicas.targets, "items", batch_size=8, shuffle=True, seed=2, streams=2)
    list(ds)  # the parent's channel is open, health watches included, when the workers fork
    ds.set_epoch(1)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    expected = local_batches("distributed", batch_size=8, seed=2, epoch=1, drop_last=False)
    assert_batches(list(loader), expected, "2 DataLoader workers x 2 streams")
    assert ds.state_dict()["fingerprint"] == ds.fingerprint()


# -- 4. fingerprints --------------------------------------------------------------------------


def test_replicas_of_one_config_report_one_fingerprint(replicas):
    infos = [BatchClient(target).describe("items") for target in replicas.targets]
    fingerprints = {info.fingerprint for info in infos}
    assert len(fingerprints) == 1 and next(iter(fingerprints)).startswith("sha256:"), fingerprints
    listed = BatchClient(replicas.targets).list_datasets()
    assert {info.name: info.fingerprint for info in listed}["items"] in fingerprints
    slow = BatchClient(replicas.targets[1]).describe("slow").fingerprint
    assert slow not in fingerprints  # another dataset of the same config


@pytest.fixture(scope="module")
def odd_replica(replicas) -> ServerProcess:
    """A fifth server on the replicas' port whose `items` has another config."""
    config = write_config(replicas.folder / "odd.toml", length=LENGTH - 2, sampler="")
    [server] = replicas.start(["127.0.0.5"], config)
    return server


def test_a_replica_with_another_config_is_refused_not_mixed_in(replicas, odd_replica):
    good = replicas.targets[0]
    expected = local_batches("distributed", batch_size=8, seed=1, epoch=0, drop_last=False)
    mixed = RemoteDataset([good, odd_replica.target], "items", batch_size=8, shuffle=True, seed=1)
    refused = None
    for _ in range(20):  # passes; round robin sends one of the first few calls to each
        mixed.set_epoch(0)
        received: list[Any] = []
        try:
            for batch in mixed:
                received.append(batch)
        except FingerprintMismatch as error:
            refused = error
        if mixed.fingerprint() == BatchClient(good).describe("items").fingerprint:
            assert_batches(received, expected[: len(received)], "before the refusal")
        if refused is not None:
            break
    assert refused is not None, "the odd replica was never refused"
    message = str(refused)
    assert refused.expected != refused.actual
    for name in (refused.expected, refused.actual, "'items'"):
        assert name in message, message
    assert {refused.replica, refused.expected_from.removeprefix("replica ")} == {
        good,
        odd_replica.target,
    }, message
    assert "configs differ" in message, message


def test_the_server_refuses_a_request_for_another_fingerprint(odd_replica):
    request = pb.StreamBatchesRequest(
        dataset="items", batch_size=8, world_size=1, fingerprint="sha256:" + "0" * 64
    )
    for call in (
        BatchClient(odd_replica.target).count_batches,
        lambda r: list(BatchClient(odd_replica.target).batches(r)),
    ):
        with pytest.raises(ServerError) as info:
            call(request)
        assert info.value.code.name == "FAILED_PRECONDITION"
        assert "sha256:" + "0" * 64 in info.value.details
        assert odd_replica.target in info.value.details
        assert info.value.metadata["batchwire-replica"] == odd_replica.target


def test_a_checkpoint_is_not_resumed_against_a_changed_dataset(replicas, odd_replica):
    ds = RemoteDataset(replicas.targets, "items", batch_size=8, shuffle=True, seed=4)
    passed = iter(ds)
    next(passed), next(passed)
    state = ds.state_dict()
    assert state["fingerprint"] == ds.fingerprint() and state["batch"] == 2
    same = RemoteDataset(replicas.targets[2], "items", batch_size=8, shuffle=True, seed=4)
    same.load_state_dict(state)
    expected = local_batches("distributed", batch_size=8, seed=4, epoch=0, drop_last=False)
    assert_batches(list(same), expected[2:], "resumed on another replica")
    changed = RemoteDataset(odd_replica.target, "items", batch_size=8, shuffle=True, seed=4)
    changed.load_state_dict(state)
    with pytest.raises(FingerprintMismatch, match="the checkpoint was saved against") as info:
        list(changed)
    assert info.value.expected == state["fingerprint"] != info.value.actual


# -- client-side health checking ------------------------------------------------------------


def health(target: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="batchwire.v1.BatchService")
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_draining_replica_is_skipped(replicas):
    config = write_config(replicas.folder / "draining.toml", grace=60)
    [draining] = replicas.start(["127.0.0.6"], config)
    good = replicas.targets[0]
    both = [good, draining.target]
    client = BatchClient(both)
    answering(client, set(both))
    # A stream open on it keeps it draining (up to grace_seconds) once it has SIGTERM.
    held = BatchClient(draining.target).batches(
        pb.StreamBatchesRequest(dataset="slow", batch_size=4, world_size=1)
    )
    next(held)
    draining.process.send_signal(signal.SIGTERM)
    try:
        deadline = time.monotonic() + 60  # bounds a hang only
        while health(draining.target) != "NOT_SERVING":
            assert time.monotonic() < deadline, "the replica never turned NOT_SERVING"
            time.sleep(0.05)
        # Client-side health checking: NOT_SERVING takes the replica out of the rotation
        # (once its health watch tells the client, a moment after): 10 calls in a row go
        # to the other one. Round robin without health checks would alternate.
        answered: list[str] = []
        deadline = time.monotonic() + 60  # bounds a hang only
        while answered[-10:] != [good] * 10:
            assert time.monotonic() < deadline, (
                f"the draining replica still answers: {answered[-10:]}"
            )
            answered.append(client.describe("items").replica)
            time.sleep(0.01)
    finally:
        held.close()
        draining.stop()


# -- 3. a replica that joins, found again through DNS --------------------------------------


def test_a_fourth_replica_that_joins_receives_streams(replicas):
    ds = RemoteDataset(
        replicas.dns.target(replicas.port), "slow", batch_size=4, shuffle=True, seed=5, streams=3
    )
    fourth: list[ServerProcess] = []
    joining = threading.Thread(target=lambda: fourth.extend(replicas.start(["127.0.0.4"])))
    reconnects = 0
    deadline = time.monotonic() + 240  # bounds a hang only: one epoch lasts about 2 s
    for epoch in itertools.count():
        assert time.monotonic() < deadline, f"the 4th replica served no stream in {epoch} epochs"
        ds.set_epoch(epoch)
        assert_batches(list(ds), slow_batches(batch_size=4, seed=5, epoch=epoch), f"epoch {epoch}")
        reconnects += ds.stats().reconnects
        if epoch == 0:
            joining.start()
        if fourth and stream_starts(fourth[0]) and reconnects:
            break
    joining.join()
    assert stream_starts(fourth[0]) > 0, f"the 4th replica served no stream in {epoch + 1} epochs"
    # Connections live 5 s (max_connection_age_seconds): the streams they carried were
    # cut and resumed, exactly once (the batches above are all there, in order).
    assert reconnects > 0


# -- 2. replicas lost mid-epoch ---------------------------------------------------------------


def test_replicas_killed_and_drained_mid_epoch_lose_no_batch(replicas):
    ds = RemoteDataset(replicas.targets, "slow", batch_size=4, shuffle=True, seed=9, streams=3)
    expected = slow_batches(batch_size=4, seed=9, epoch=0)
    received = []
    draining = threading.Thread(target=replicas.servers[2].stop)
    for batch in ds:
        received.append(batch)
        if len(received) == 6:
            replicas.servers[1].kill()  # SIGKILL
            draining.start()  # SIGTERM: drains for grace_seconds = 1
    draining.join()
    assert_batches(received, expected, "after a SIGKILL and a SIGTERM")
    assert ds.stats().reconnects > 0
