"""batchwire's client: stream a served dataset's batches into a training loop.

from batchwire.client import RemoteDataset
ds = RemoteDataset("localhost:50051", "digits", batch_size=64, shuffle=True)
for x, y in ds:
    ...
"""

from batchwire.client._channel import BatchClient
from batchwire.client._dataset import RemoteDataset
from batchwire.client._errors import BatchwireError, ServerError

__all__ = ["BatchClient", "BatchwireError", "RemoteDataset", "ServerError"]
