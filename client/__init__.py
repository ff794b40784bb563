"""batchwire's client: stream a served dataset's batches into a training loop.

from batchwire.client import DevicePrefetcher, RemoteDataset
ds = RemoteDataset("localhost:50051", "digits", batch_size=64, shuffle=True)
for x, y in DevicePrefetcher(ds, "cuda"):
    ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchwire.client._channel import BatchClient
    from batchwire.client._dataset import RemoteDataset
    from batchwire.client._errors import (
        BatchwireError,
        ConnectError,
        FingerprintMismatch,
        ServerError,
        TargetError,
    )
    from batchwire.client._prefetch import DevicePrefetcher
    from batchwire.client._retry import RetryError, RetryPolicy
    from batchwire.client._shm import TransportError
    from batchwire.client._stats import StreamStats, enable_metrics

# Imported on first use (PEP 562), so that ``batchwire health`` and other light
# users of the package's modules (targets, credentials) do not pay for torch.
_HOMES = {
    "BatchClient": "_channel",
    "RemoteDataset": "_dataset",
    "BatchwireError": "_errors",
    "ConnectError": "_errors",
    "FingerprintMismatch": "_errors",
    "ServerError": "_errors",
    "TargetError": "_errors",
    "DevicePrefetcher": "_prefetch",
    "RetryError": "_retry",
    "RetryPolicy": "_retry",
    "TransportError": "_shm",
    "StreamStats": "_stats",
    "enable_metrics": "_stats",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "BatchClient",
    "BatchwireError",
    "ConnectError",
    "DevicePrefetcher",
    "FingerprintMismatch",
    "RemoteDataset",
    "RetryError",
    "RetryPolicy",
    "ServerError",
    "StreamStats",
    "TargetError",
    "TransportError",
    "enable_metrics",
]
