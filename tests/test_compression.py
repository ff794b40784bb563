"""Per-request payload compression: codec round trips and real streams that match uncompressed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from _serverproc import ServerProcess
from conftest import assert_same_batch

from batchwire import compression
from batchwire.client import BatchClient, ServerError
from batchwire.v1 import batchwire_pb2 as pb


@pytest.mark.parametrize("codec", [pb.LZ4, pb.ZSTD])
def test_round_trip_and_ratio(codec: int) -> None:
    image = np.zeros((64, 3, 32, 32), np.uint8)
    image[:, :, 8:24, 8:24] = np.arange(16, dtype=np.uint8)  # flat regions compress well
    payload = memoryview(image.tobytes())
    header = pb.BatchHeader(payload_size=len(payload), raw_size=len(payload))
    packed = compression.compress_batch(header, payload, codec)
    assert header.compression == codec and header.raw_size == len(payload)
    assert header.payload_size == len(packed) < len(payload) // 10
    assert compression.decompress(codec, packed, header.raw_size) == payload.tobytes()


def test_none_leaves_the_payload_alone() -> None:
    payload = memoryview(b"abc")
    header = pb.BatchHeader(payload_size=3, raw_size=3)
    assert compression.compress_batch(header, payload, pb.NONE) is payload
    assert header.compression == pb.NONE


def test_wrong_size_is_an_error() -> None:
    packed = compression.compress(pb.LZ4, b"x" * 100)
    with pytest.raises(
        compression.CompressionError, match="decompressed to 100 bytes, header says 99"
    ):
        compression.decompress(pb.LZ4, packed, 99)


def _batches(server: ServerProcess, codec: int, dataset: str, batch_size: int) -> list:
    request = pb.StreamBatchesRequest(
        dataset=dataset, batch_size=batch_size, world_size=1, compression=codec
    )
    return list(BatchClient(server.target).batches(request))


@pytest.mark.parametrize("codec", [pb.LZ4, pb.ZSTD])
@pytest.mark.parametrize(("dataset", "batch_size"), [("dict", 16), ("big", 3)])
def test_compressed_stream_equals_plain(
    core_server: ServerProcess, codec: int, dataset: str, batch_size: int
) -> None:
    plain = _batches(core_server, pb.NONE, dataset, batch_size)
    packed = _batches(core_server, codec, dataset, batch_size)
    assert [i for i, _ in packed] == [i for i, _ in plain]
    for (i, a), (_, b) in zip(packed, plain, strict=True):
        assert_same_batch(a, b, f"batch {i}")


def test_unknown_codec_is_invalid_argument(core_server: ServerProcess) -> None:
    with pytest.raises(ServerError) as caught:
        _batches(core_server, 7, "dict", 4)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression" in caught.value.details and "7" in caught.value.details


def test_remote_dataset_asks_for_compression(core_server: ServerProcess) -> None:
    from batchwire.client import RemoteDataset

    plain = list(RemoteDataset(core_server.target, "dict", batch_size=16))
    squeezed = RemoteDataset(core_server.target, "dict", batch_size=16, compression="zstd")
    assert squeezed.request(0).compression == pb.ZSTD
    for i, (got, want) in enumerate(zip(list(squeezed), plain, strict=True)):
        assert_same_batch(got, want, f"batch {i}")
    with pytest.raises(ValueError, match="one of none, lz4, zstd"):
        RemoteDataset(core_server.target, "dict", batch_size=16, compression="gzip")
