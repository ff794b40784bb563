"""Optional payload compression (lz4, zstd), shared by server and client.

A client asks for a codec in ``StreamBatchesRequest.compression``; the server
compresses each batch payload as one LZ4 or Zstandard frame (``raw_size``
says how large it was) and the client decompresses it before decoding. It
pays for compressible data (uint8 images with flat regions, sparse or
low-entropy tensors) when the link, not the CPU, is the limit; on random or
float noise it only costs CPU (see benchmarks/RESULTS.md). The codecs are
imported on first use, so a stream without compression never loads them.
"""

from __future__ import annotations

import threading
from typing import Any

from batchwire.v1 import batchwire_pb2 as pb

ZSTD_LEVEL = 1  # zstd's fastest standard level: the point is bandwidth, not ratio
_local = threading.local()  # zstd (de)compressor objects are not thread-safe


class CompressionError(ValueError):
    """A payload that does not decompress to the size its header says."""


NAMES = ("none", "lz4", "zstd")


def name(codec: int) -> str:
    return pb.Compression.Name(codec).lower()


def codec(codec_name: str) -> int:
    """The ``Compression`` value of ``"none"``, ``"lz4"`` or ``"zstd"``."""
    if codec_name not in NAMES:
        raise ValueError(f"compression should be one of {', '.join(NAMES)}, got {codec_name!r}")
    return pb.Compression.Value(codec_name.upper())


def compress(codec: int, payload: Any) -> bytes:
    """Compresses ``payload`` (any buffer) into one frame of ``codec``."""
    if codec == pb.LZ4:
        import lz4.frame

        return lz4.frame.compress(payload, store_size=True)
    if codec == pb.ZSTD:
        return _zstd("compressor").compress(payload)
    raise CompressionError(f"cannot compress with codec {codec} ({_known()})")


def compress_batch(header: pb.BatchHeader, payload: Any, codec: int) -> Any:
    """Compresses a batch's payload for the wire; sets ``header.compression`` and sizes.

    ``codec`` is the request's; NONE returns ``payload`` untouched.
    """
    if codec == pb.NONE or not len(payload):
        return payload
    packed = compress(codec, payload)
    header.compression = codec
    header.raw_size = len(payload)
    header.payload_size = len(packed)
    return packed


def check_codec(codec: int) -> None:
    """Raises ``CompressionError`` for a codec this build cannot produce."""
    if codec not in (pb.NONE, pb.LZ4, pb.ZSTD):
        raise CompressionError(f"unknown compression {codec}; {_known()} (or none)")


def decompress(codec: int, payload: Any, raw_size: int) -> bytes:
    """Decompresses one frame; checks that it gives ``raw_size`` bytes."""
    if codec == pb.LZ4:
        import lz4.frame

        raw = lz4.frame.decompress(payload)
    elif codec == pb.ZSTD:
        raw = _zstd("decompressor").decompress(payload, max_output_size=raw_size)
    else:
        raise CompressionError(f"cannot decompress codec {codec} ({_known()})")
    if len(raw) != raw_size:
        raise CompressionError(
            f"{name(codec)} payload decompressed to {len(raw)} bytes, header says {raw_size}"
        )
    return raw


def _zstd(kind: str) -> Any:
    codec = getattr(_local, kind, None)
    if codec is None:
        import zstandard

        codec = (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            if kind == "compressor"
            else zstandard.ZstdDecompressor()
        )
        setattr(_local, kind, codec)
    return codec


def _known() -> str:
    return "known: lz4, zstd"
