"""TLS, mutual TLS, bearer tokens, and the limits that protect a shared server."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from _serverproc import ServerProcess, batchwire_command
from ops_support import health_status, write_pki
from test_ops_health import write_config

from batchwire.client import BatchClient, RemoteDataset, ServerError

TOKEN = "s3cret-token-value"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))


def first_batch(target: str) -> dict:
    """One plain stream, no client retries: the server's answer is what the test sees."""
    request = RemoteDataset(target, "dict", batch_size=4).request(0)
    return next(BatchClient(target, timeout=5).batches(request))[1]


def clear_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CA", "CERT", "KEY", "SERVER_NAME"):
        monkeypatch.delenv(f"BATCHWIRE_TLS_{name}", raising=False)
    monkeypatch.delenv("BATCHWIRE_TOKEN", raising=False)
    monkeypatch.delenv("BATCHWIRE_TOKEN_FILE", raising=False)


def test_tls(tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    clear_credentials(monkeypatch)
    tls = f'[server.tls]\ncert = "{pki["server-cert"]}"\nkey = "{pki["server-key"]}"'
    with ServerProcess(write_config(tmp_path, tls), workers=1) as server:
        # A plaintext client cannot talk to a TLS server.
        with pytest.raises(ServerError) as plain:
            first_batch(server.target)
        assert plain.value.code == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setenv("BATCHWIRE_TLS_CA", str(pki["ca"]))
        assert first_batch(server.target)["index"].tolist() == [0, 1, 2, 3]
        credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        assert health_status(server.target, credentials) == "SERVING"


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    clear_credentials(monkeypatch)
    tls = (
        f'[server.tls]\ncert = "{pki["server-cert"]}"\nkey = "{pki["server-key"]}"\n'
        f'client_ca = "{pki["ca"]}"\nrequire_client_cert = true'
    )
    with ServerProcess(write_config(tmp_path, tls), workers=1) as server:
        monkeypatch.setenv("BATCHWIRE_TLS_CA", str(pki["ca"]))
        with pytest.raises(ServerError) as anonymous:
            first_batch(server.target)
        assert anonymous.value.code == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setenv("BATCHWIRE_TLS_CERT", str(pki["rogue-cert"]))
        monkeypatch.setenv("BATCHWIRE_TLS_KEY", str(pki["rogue-key"]))
        with pytest.raises(ServerError) as rogue:
            first_batch(server.target)
        assert rogue.value.code == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setenv("BATCHWIRE_TLS_CERT", str(pki["client-cert"]))
        monkeypatch.setenv("BATCHWIRE_TLS_KEY", str(pki["client-key"]))
        assert first_batch(server.target)["index"].tolist() == [0, 1, 2, 3]


def test_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_credentials(monkeypatch)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# trainers\n{TOKEN}\n")
    auth = f'log_level = "DEBUG"\n[server.auth]\ntokens_file = "{tokens}"'
    with ServerProcess(write_config(tmp_path, auth), workers=1) as server:
        for presented in (None, "wrong-token"):
            if presented:
                monkeypatch.setenv("BATCHWIRE_TOKEN", presented)
            with pytest.raises(ServerError) as rejected:
                first_batch(server.target)
            assert rejected.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in rejected.value.details
            with pytest.raises(ServerError) as listing:
                BatchClient(server.target, timeout=5).list_datasets()
            assert listing.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open to probes without a token.
        assert health_status(server.target) == "SERVING"
        token_file = tmp_path / "my-token"
        token_file.write_text(TOKEN + "\n")
        monkeypatch.delenv("BATCHWIRE_TOKEN")
        monkeypatch.setenv("BATCHWIRE_TOKEN_FILE", str(token_file))
        assert first_batch(server.target)["index"].tolist() == [0, 1, 2, 3]
        monkeypatch.delenv("BATCHWIRE_TOKEN_FILE")
        monkeypatch.setenv("BATCHWIRE_TOKEN", TOKEN)
        assert [d.name for d in BatchClient(server.target).list_datasets()] == ["dict"]
    output = "".join(server.output)
    assert "rejected" in output  # DEBUG logging was on ...
    assert TOKEN not in output and "wrong-token" not in output  # ... and no token was logged


def test_tokens_from_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_credentials(monkeypatch)
    auth = '[server.auth]\ntokens_env = "TRAINER_TOKENS"'
    env = {"TRAINER_TOKENS": f"other,{TOKEN}"}
    with ServerProcess(write_config(tmp_path, auth), workers=1, env=env) as server:
        with pytest.raises(ServerError):
            first_batch(server.target)
        monkeypatch.setenv("BATCHWIRE_TOKEN", TOKEN)
        assert first_batch(server.target)["index"].tolist() == [0, 1, 2, 3]


def test_stream_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 20 ms an item: the two streams stay open (a fast stream of tiny batches may be
    # wholly sent, and its slot freed, before the client reads its second batch).
    config = write_config(
        tmp_path, "max_concurrent_streams = 2\nprefetch_batches = 1", item_seconds=0.02
    )
    with ServerProcess(config, workers=1) as server:
        client = BatchClient(server.target)
        dataset = RemoteDataset(server.target, "dict", batch_size=1)
        open_streams = [client.batches(dataset.request(0)) for _ in range(2)]
        for stream in open_streams:
            next(stream)
        with pytest.raises(ServerError) as refused:
            first_batch(server.target)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_streams" in refused.value.details
        assert refused.value.metadata.get("batchwire-transient") == "stream-limit"
        # A trainer that arrives now waits its turn (RetryPolicy backs off) instead of failing.
        waiting: list = []
        trainer = threading.Thread(
            target=lambda: waiting.extend(RemoteDataset(server.target, "dict", batch_size=4))
        )
        with caplog.at_level(logging.WARNING, logger="batchwire.client"):
            trainer.start()
            while not any("max_concurrent_streams" in r.getMessage() for r in caplog.records):
                assert trainer.is_alive(), "the trainer ended without being refused"
                time.sleep(0.05)
            # The open streams are unharmed, and a slot frees up when one ends.
            assert len(list(open_streams[0])) == 63
            trainer.join(timeout=120)
        assert not trainer.is_alive() and len(waiting) == 16
        assert len(list(open_streams[1])) == 63


def test_batch_byte_limit(tmp_path: Path) -> None:
    with ServerProcess(write_config(tmp_path, "max_batch_bytes = 1024"), workers=1) as server:
        with pytest.raises(ServerError) as too_big:
            list(
                BatchClient(server.target).batches(
                    RemoteDataset(server.target, "dict", batch_size=64).request(0)
                )
            )
        assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_batch_bytes=1024" in too_big.value.details
        assert "would have about" in too_big.value.details  # refused before any worker built it
        assert len(list(RemoteDataset(server.target, "dict", batch_size=4))) == 16


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ('[server.tls]\ncert = "missing.pem"\nkey = "missing.pem"', "server.tls.cert"),
        ('[server.auth]\ntokens_env = "BATCHWIRE_NO_SUCH_VARIABLE"', "server.auth.tokens_env"),
        ("keepalive_seconds = -1", "server.keepalive_seconds"),
        ("max_message_bytes = 1000", "server.chunk_bytes"),
    ],
)
def test_bad_security_settings_stop_serve(tmp_path: Path, server: str, key: str) -> None:
    import subprocess

    config = write_config(tmp_path, server)
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and key in result.stderr
