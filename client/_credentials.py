"""How a client reaches a secured server: TLS and a bearer token, from the environment.

The environment, not arguments, because a trainer's channels are opened in
many places (DataLoader workers, resumed processes, ``batchwire`` commands)
and every one of them must present the same credentials:

    BATCHWIRE_TLS_CA           PEM CA bundle that the server certificate chains to (enables TLS)
    BATCHWIRE_TLS_CERT/_KEY    PEM client certificate and key, for mutual TLS
    BATCHWIRE_TLS_SERVER_NAME  the name to check the certificate against, if not the target's host
    BATCHWIRE_TOKEN            a bearer token, sent as ``authorization: Bearer <token>``
    BATCHWIRE_TOKEN_FILE       a file holding that token (read when the channel opens)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from batchwire.client._errors import BatchwireError


class CredentialsError(BatchwireError, ValueError):
    """A credentials variable points at something unusable."""


VARIABLES = (
    "BATCHWIRE_TLS_CA",
    "BATCHWIRE_TLS_CERT",
    "BATCHWIRE_TLS_KEY",
    "BATCHWIRE_TLS_SERVER_NAME",
    "BATCHWIRE_TOKEN",
    "BATCHWIRE_TOKEN_FILE",
)


def environment() -> tuple[str | None, ...]:
    """The credential settings now; channels are cached per target *and* these."""
    return tuple(os.environ.get(name) for name in VARIABLES)


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{variable}={path}: {exc.strerror}") from None


def bearer_token() -> str | None:
    token = os.environ.get("BATCHWIRE_TOKEN")
    if token:
        return token.strip()
    data = _read("BATCHWIRE_TOKEN_FILE")
    return data.decode().strip() if data else None


def open_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``target`` with the TLS and token settings of the environment."""
    options = list(options)
    root = _read("BATCHWIRE_TLS_CA")
    cert, key = _read("BATCHWIRE_TLS_CERT"), _read("BATCHWIRE_TLS_KEY")
    if (cert is None) != (key is None):
        raise CredentialsError("mutual TLS needs both BATCHWIRE_TLS_CERT and BATCHWIRE_TLS_KEY")
    if root is None and cert is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        server_name = os.environ.get("BATCHWIRE_TLS_SERVER_NAME")
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root, key, cert)
        channel = grpc.secure_channel(target, credentials, options=options)
    token = bearer_token()
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the token to every call; works on plain channels too (e.g. inside a compose network)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
