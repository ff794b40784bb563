"""TLS credentials and bearer-token authentication for the server.

Tokens are compared in constant time and never logged. The standard health
service stays open without a token, so that orchestrators' probes (and
``batchwire health``) work on an authenticated server.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from batchwire.server.config import AuthConfig, TlsConfig

log = logging.getLogger(__name__)

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key = Path(tls.key).read_bytes()
    cert = Path(tls.cert).read_bytes()
    client_ca = Path(tls.client_ca).read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=tls.require_client_cert
    )


def load_tokens(auth: AuthConfig) -> tuple[str, ...]:
    tokens: list[str] = []
    if auth.tokens_file:
        for line in Path(auth.tokens_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    if auth.tokens_env:
        tokens += [t.strip() for t in os.environ.get(auth.tokens_env, "").split(",") if t.strip()]
    if not tokens:
        raise ValueError("server.auth is configured but no tokens were found")
    return tuple(tokens)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` matching a configured token.

    A rejected call never decodes its request (undecodable bytes get UNAUTHENTICATED
    too) and is logged at DEBUG only: ``batchwire_errors_total{code="UNAUTHENTICATED"}``
    counts them, and a caller without a token cannot fill the log.
    """

    def __init__(
        self, tokens: tuple[str, ...], on_reject: Callable[[], None] = lambda: None
    ) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        self._on_reject = on_reject

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                presented = token.strip().encode()
                # Compare against every token so timing does not reveal which prefix matched.
                return any([hmac.compare_digest(presented, known) for known in self._tokens])
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        self._on_reject()
        log.debug("rejected %s: missing or invalid bearer token", handler_call_details.method)
        return _denying(handler)


async def _deny(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
    )


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED.

    It takes the request as bytes: nothing a caller without a token sends is decoded.
    """
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny)
    return grpc.stream_stream_rpc_method_handler(_deny)
