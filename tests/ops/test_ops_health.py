"""Health states (starting, serving, draining), reflection, `batchwire health`, graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from _serverproc import ServerProcess, batchwire_command, free_port
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from ops_support import wait_for_health

from batchwire.client import BatchClient, RemoteDataset, RetryPolicy, ServerError

TESTS_DIR = Path(__file__).resolve().parent.parent


def write_config(
    folder: Path, server: str = "", *, slow_seconds: float = 0.0, item_seconds: float = 0.0
) -> Path:
    path = folder / "ops.toml"
    path.write_text(
        f"""
[server]
python_path = ["{TESTS_DIR}", "{TESTS_DIR / "ops"}"]
chunk_bytes = 65536
{server}

[datasets.dict]
source = "python"
factory = "ops_support:slow_in_workers"
kwargs = {{ length = 64, seconds = {slow_seconds}, item_seconds = {item_seconds} }}
"""
    )
    return path


def one_stream(target: str) -> list:
    """All batches of one plain stream, without the client's retries."""
    request = RemoteDataset(target, "dict", batch_size=4).request(0)
    return list(BatchClient(target, timeout=5).batches(request))


def health_command(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*batchwire_command(), "health", "--target", target],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health_reports_starting_then_serving(tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    config = write_config(tmp_path, slow_seconds=10.0)  # room to see NOT_SERVING when loaded
    server = ServerProcess(config, port=port, workers=2)
    starter = threading.Thread(target=server.start)
    starter.start()
    try:
        seen = wait_for_health(target, "NOT_SERVING", timeout=60)
        # While the workers open their datasets: health answers, streams are refused.
        with pytest.raises(ServerError) as refused:
            one_stream(target)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "starting" in refused.value.details
        assert health_command(target).returncode == 1
        seen += wait_for_health(target, "SERVING", timeout=60)
        assert "NOT_SERVING" in seen and seen[-1] == "SERVING"
        result = health_command(target)
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
    finally:
        starter.join()
        server.stop()


def test_health_command_fails_when_nothing_listens() -> None:
    result = health_command(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_the_health_probe_does_not_import_torch() -> None:
    # Kubernetes runs it every few seconds in every replica: torch's import alone is
    # 1-2 s of CPU, which made probes slow and timeouts long (deploy/kubernetes).
    probe = (
        "import sys; from batchwire.cli import main; "
        f"code = main(['health', '--target', '127.0.0.1:{free_port()}', '--timeout', '1']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_reflection_lists_the_services(tmp_path: Path) -> None:
    with ServerProcess(write_config(tmp_path), workers=1) as server:
        with grpc.insecure_channel(server.target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            service = DescriptorPool(database).FindServiceByName("batchwire.v1.BatchService")
            methods = [method.name for method in service.methods]
        assert {"batchwire.v1.BatchService", "grpc.health.v1.Health"} <= services
        assert {"ListDatasets", "DescribeDataset", "StreamBatches"} <= set(methods)


def test_sigterm_drains_then_exits_zero_and_a_client_resumes_on_a_new_server(
    tmp_path: Path,
) -> None:
    port = free_port()
    # Items load slowly, so the stream is still open when the grace period ends.
    # Grace 3 s: time to see NOT_SERVING on a loaded machine; 32 batches of 0.2 s outlast it.
    config = write_config(tmp_path, "grace_seconds = 3\nprefetch_batches = 1", item_seconds=0.1)
    expected = [int(i) for i in range(64)]
    received: list[int] = []
    server = ServerProcess(config, port=port, workers=1).start()
    try:
        dataset = RemoteDataset(server.target, "dict", batch_size=2)
        stream = BatchClient(server.target).batches(dataset.request(0))
        for _ in range(3):  # an open stream, read slowly
            received += next(stream)[1]["index"].tolist()
        server.process.send_signal(signal.SIGTERM)
        seen = wait_for_health(server.target, "NOT_SERVING", timeout=10)
        assert seen[-1] == "NOT_SERVING"
        # Draining: new streams are refused, the open one goes on for the grace period.
        with pytest.raises(ServerError) as refused:
            one_stream(server.target)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ServerError) as ended:
            for _, batch in stream:
                received += batch["index"].tolist()
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"resume at batch {len(received) // 2}" in ended.value.details
        assert server.process.wait(timeout=30) == 0
        output = "".join(server.output)
        assert "stream end" in output and "status=UNAVAILABLE" in output

        # The same client position, on a new server on the same port.
        with ServerProcess(config, port=port, workers=1) as restarted:
            request = dataset.request(0, start_batch=len(received) // 2)
            for _, batch in BatchClient(restarted.target).batches(request):
                received += batch["index"].tolist()
        assert received == expected
    finally:
        server.stop()


def test_remote_dataset_rides_through_a_graceful_restart(tmp_path: Path) -> None:
    """SIGTERM mid-epoch, a new server on the same port: the iterating client notices nothing."""
    port = free_port()
    config = write_config(tmp_path, "grace_seconds = 0.5\nprefetch_batches = 1", item_seconds=0.05)
    server = ServerProcess(config, port=port, workers=1).start()
    replacement = ServerProcess(config, port=port, workers=1)
    try:
        dataset = RemoteDataset(
            server.target,
            "dict",
            batch_size=2,
            retry=RetryPolicy(attempts=60, deadline=120, initial_backoff=0.1, max_backoff=0.5),
        )
        received: list[int] = []
        for batch in dataset:
            received += batch["index"].tolist()
            if len(received) == 6:
                server.process.send_signal(signal.SIGTERM)
                assert server.process.wait(timeout=30) == 0
                replacement.start()
        assert received == list(range(64))
        assert "status=UNAVAILABLE" in "".join(server.output)
        assert "start=" in "".join(replacement.output)
    finally:
        server.stop()
        replacement.stop()
