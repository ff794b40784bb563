"""The client's exceptions.

BatchwireError            anything batchwire raises
├── ServerError           the server ended a call with a gRPC status
│   (.code: grpc.StatusCode, .details: the server's message)
├── RetryError            reconnecting gave up (.attempts, .elapsed, .last_error)
├── ConnectError          the server was never reached within the connect timeout (.target)
├── FingerprintMismatch   a replica or checkpoint of another config of the dataset (.expected, .actual)
├── TargetError           a target gRPC cannot parse (no port, an unknown scheme, ...)
└── CredentialsError      a BATCHWIRE_TLS_* / BATCHWIRE_TOKEN_FILE setting is unusable
"""

from __future__ import annotations

import grpc


class BatchwireError(Exception):
    """Base of every error the batchwire client raises."""


class ServerError(BatchwireError):
    """The server answered with an error status; ``code`` and ``details`` say which and why."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        target: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.details = details
        self.target = target
        self.metadata = metadata or {}
        """The server's ``batchwire-*`` trailing metadata (facts for the client, e.g. a fingerprint)."""
        where = f" from {target}" if target else ""
        super().__init__(f"{code.name}{where}: {details}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, target: str = "") -> ServerError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        metadata = {
            key: value
            for key, value in (trailing or ())
            if isinstance(value, str) and key.startswith("batchwire-")
        }
        return cls(code, details or "", target=target, metadata=metadata)


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


class FingerprintMismatch(BatchwireError):
    """A server serves the dataset from another config than the one this client's batches
    came from: a replica configured differently, or a dataset changed since a checkpoint.

    Raised, never retried or skipped: batches of two configs are never mixed in an
    epoch (DESIGN.md, Scale). ``expected`` is the fingerprint the client holds (from
    ``expected_from``: a replica, or the checkpoint), ``actual`` the one ``replica`` has.
    """

    def __init__(
        self, dataset: str, *, expected: str, actual: str, expected_from: str, replica: str
    ) -> None:
        self.dataset = dataset
        self.expected = expected
        self.actual = actual
        self.expected_from = expected_from
        self.replica = replica
        if expected_from == CHECKPOINT:
            why = (
                f"the checkpoint was saved against fingerprint {expected}: the dataset's config "
                "changed since, so resuming would not give the batches the checkpoint counted on "
                "(to resume all the same, drop the state's 'fingerprint')"
            )
        else:
            why = (
                f"this client's batches came from fingerprint {expected} ({expected_from}): "
                "the replicas' configs differ, and their batches are never mixed; "
                "give every replica the same config"
            )
        super().__init__(
            f"dataset {dataset!r} on {replica or 'the server'} has fingerprint {actual}, but {why}"
        )


CHECKPOINT = "checkpoint"
"""``FingerprintMismatch.expected_from`` when the expected fingerprint came from ``load_state_dict``."""
