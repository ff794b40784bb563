"""The client's exceptions.

BatchwireError            anything batchwire raises
├── ServerError           the server ended a call with a gRPC status
│   (.code: grpc.StatusCode, .details: the server's message)
├── RetryError            reconnecting gave up (.attempts, .elapsed, .last_error)
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
