"""Helpers for the operations tests: slow-starting datasets, certificates, health, metrics."""

from __future__ import annotations

import datetime
import ipaddress
import multiprocessing
import time
import urllib.request
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sample_datasets import IndexedDict, SlowIndexed


def slow_in_workers(length: int, seconds: float, item_seconds: float = 0.0) -> IndexedDict:
    """A dataset that takes ``seconds`` to open in a worker process (not in the server's)."""
    if multiprocessing.current_process().name.startswith("batchwire-worker"):
        time.sleep(seconds)
        if item_seconds:
            return SlowIndexed(length, item_seconds)
    return IndexedDict(length)


def health_status(target: str, credentials: grpc.ChannelCredentials | None = None) -> str:
    """SERVING / NOT_SERVING / the gRPC error code name when the check itself fails."""
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for_health(target: str, wanted: str, timeout: float = 60.0) -> list[str]:
    """Polls until ``wanted``; returns every distinct status seen on the way, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = health_status(target)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == wanted:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{target} never reported {wanted}; saw {seen}")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The metrics endpoint as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- certificates ---------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(folder: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    files: dict[str, Path] = {}

    def save(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(data)

    ca_key = _key()
    ca = _certificate("batchwire test CA", ca_key, None, ca_key, ca=True)
    save("ca", ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = _key()
        cert = _certificate(f"batchwire {role}", key, ca, ca_key, ca=False, usage=usage)
        save(f"{role}-cert", cert.public_bytes(serialization.Encoding.PEM))
        save(f"{role}-key", _pem_key(key))
    # A CA the server does not trust, with a client certificate of its own.
    rogue_key = _key()
    rogue = _certificate("rogue CA", rogue_key, None, rogue_key, ca=True)
    key = _key()
    cert = _certificate(
        "rogue client", key, rogue, rogue_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    save("rogue-cert", cert.public_bytes(serialization.Encoding.PEM))
    save("rogue-key", _pem_key(key))
    return files
