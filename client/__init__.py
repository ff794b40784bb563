"""batchwire's client: stream a served dataset's batches into a training loop.

from batchwire.client import DevicePrefetcher, RemoteDataset
ds = RemoteDataset("localhost:50051", "digits", batch_size=64, shuffle=True)
for x, y in DevicePrefetcher(ds, "cuda"):
    ...
"""

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
