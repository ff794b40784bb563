"""The client's exceptions.

BatchwireError            anything batchwire raises
├── ServerError           the server ended a call with a gRPC status
│   (.code: grpc.StatusCode, .details: the server's message)
├── RetryError            reconnecting gave up (.attempts, .elapsed, .last_error)
├── ConnectError          the server was never reached within the connect timeout (.target)
├── TargetError           a target gRPC cannot parse (no port, an unknown scheme, ...)
└── CredentialsError      a BATCHWIRE_TLS_* / BATCHWIRE_TOKEN_FILE setting is unusable
"""

from __future__ import annotations

import grpc


class BatchwireError(Exception):
    """Base of every error the batchwire client raises."""


class ServerError(BatchwireError):
    """The server answered with an error status; ``code`` and ``details`` say which and why."""

    def __init__(self, code: grpc.StatusCode, details: str, *, target: str = "") -> None:
        self.code = code
        self.details = details
        self.target = target
        where = f" from {target}" if target else ""
        super().__init__(f"{code.name}{where}: {details}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, target: str = "") -> ServerError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "", target=target)


class ConnectError(BatchwireError, ConnectionError):
    """No connection to ``target`` came up within the connect timeout, and none ever had.

    Not a ``ServerError``: no server answered, and a ``RetryPolicy`` does not retry
    it (the policy is for outages of a server that was reached).
    """

    def __init__(self, target: str, *, timeout: float, reason: str = "") -> None:
        self.target = target
        self.timeout = timeout
        self.reason = reason
        why = f" (no connection within {timeout:g}s" + (f"; {reason})" if reason else ")")
        super().__init__(f"cannot reach {target}: is 'batchwire serve' running there?{why}")


class TargetError(BatchwireError, ValueError):
    """A server target that cannot be parsed; the message says what a target looks like."""
