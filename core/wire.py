"""Encodes batches into wire frames and decodes them back; shared by server and client.

A batch is a nest of tensors (tuple, list, dict). It travels as one
``BatchHeader`` (dtype, shape and offset of each tensor, plus the nesting) and
a payload: the tensors' raw little-endian bytes laid end to end, each at a
64-byte aligned offset. The payload is cut into chunks of a few MiB; each
chunk is one ``BatchChunk`` message.

The server does not build ``BatchChunk`` objects: assigning and serialising a
protobuf ``bytes`` field copies the payload several times. A frame is instead
the serialised header (field 1) followed by a hand-written field 2 tag and
length and the raw payload slice, which is the same protobuf on the wire.
The server fills each frame in place: payload bytes that lie in a worker's
file are read with ``preadv`` straight into the message (``FileSlice``), the
one copy grpcio's ``bytes``-only API leaves. The client slices frames the same
way instead of parsing them, so tensors are ``torch.frombuffer`` views of the
received bytes (one copy to reassemble a batch that spans several chunks, into
a buffer reused once that batch's tensors are gone; none otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import math
import mmap
import os
import queue
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchwire import allocator
from batchwire.v1 import batchwire_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - no big-endian host in sight
    raise ImportError("batchwire's wire format assumes a little-endian host")

# Tensors decoded from a received `bytes` object share its memory; the message
# is owned by the batch alone, so writing to them is safe. torch warns about
# read-only buffers once per process: spend that warning here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)

ALIGNMENT = 64
DEFAULT_CHUNK_BYTES = 4 << 20

_TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int8: pb.INT8,
    torch.int16: pb.INT16,
    torch.int32: pb.INT32,
    torch.int64: pb.INT64,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
}
_WIRE_TO_TORCH = {wire: dtype for dtype, wire in _TORCH_TO_WIRE.items()}

_HEADER_TAG = bytes([(1 << 3) | 2])  # BatchChunk.header, length-delimited
_DATA_TAG = bytes([(2 << 3) | 2])  # BatchChunk.data, length-delimited
_PACKED_TAG = bytes([(3 << 3) | 2])  # BatchChunk.packed, length-delimited
_SHARED_TAG = bytes([(4 << 3) | 2])  # BatchChunk.shared_memory, length-delimited

MAX_BATCHES_PER_MESSAGE = 16
"""What Python clients accept in one message (``StreamBatchesRequest.max_batches_per_message``)."""


MAX_DEPTH = 32
"""Most containers nested in a batch. Each level is two protobuf messages, and protobuf
refuses to decode past 100: a deeper batch could be sent but never read."""


class WireError(ValueError):
    """A batch that cannot be encoded, or a frame that cannot be decoded."""


def wire_dtype(dtype: torch.dtype) -> int:
    """Returns the wire ``DType`` of a torch dtype."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _TORCH_TO_WIRE)
        raise WireError(f"dtype {dtype} cannot travel; supported: {supported}") from None


def torch_dtype(wire: int) -> torch.dtype:
    """Returns the torch dtype of a wire ``DType``."""
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise WireError(f"unknown wire dtype {wire}") from None


def dtype_name(wire: int) -> str:
    return pb.DType.Name(wire).lower()


# -- structure ----------------------------------------------------------------


def flatten(batch: Any) -> tuple[list[torch.Tensor], pb.Node]:
    """Splits a nest of tensors into a flat tensor list and its structure.

    Numbers and numpy arrays become tensors, as ``default_collate`` would make
    them. Raises ``WireError`` for anything else (strings, custom objects) and
    for containers nested deeper than ``MAX_DEPTH``.
    """
    tensors: list[torch.Tensor] = []

    def visit(obj: Any, path: str, depth: int = 0) -> pb.Node:
        if depth >= MAX_DEPTH and isinstance(obj, Mapping | tuple | list):
            raise WireError(
                f"cannot send a batch nested more than {MAX_DEPTH} containers deep "
                f"(at {path[:80]!r}...): protobuf cannot decode it"
            )
        if isinstance(obj, torch.Tensor):
            try:
                wire_dtype(obj.dtype)
            except WireError as exc:
                raise WireError(f"{exc} (at {path!r})" if path else str(exc)) from None
            tensors.append(obj)
            return pb.Node(tensor=len(tensors) - 1)
        if isinstance(obj, np.ndarray | np.generic | bool | int | float):
            tensors.append(torch.as_tensor(np.asarray(obj)))
            return pb.Node(tensor=len(tensors) - 1)
        if isinstance(obj, Mapping):
            keys = [str(key) for key in obj]
            values = [
                visit(value, f"{path}.{key}" if path else str(key), depth + 1)
                for key, value in obj.items()
            ]
            return pb.Node(map=pb.NodeMap(keys=keys, values=values))
        if isinstance(obj, tuple | list):
            items = [
                visit(value, f"{path}.{i}" if path else str(i), depth + 1)
                for i, value in enumerate(obj)
            ]
            nodes = pb.NodeList(items=items)
            return pb.Node(tuple=nodes) if isinstance(obj, tuple) else pb.Node(list=nodes)
        where = f" at {path!r}" if path else ""
        raise WireError(
            f"cannot send a {type(obj).__name__}{where}: batches may only hold tensors, "
            "numpy arrays and numbers, nested in tuples, lists and dicts"
        )

    try:
        structure = visit(batch, "")
    finally:
        # `visit` refers to itself through its closure: a cycle that would keep every
        # tensor of the batch alive until the cyclic GC runs (a worker's memory grew
        # by a batch per batch). Clearing the name breaks it.
        visit = None  # type: ignore[assignment]
    return tensors, structure


def unflatten(structure: pb.Node, tensors: list[torch.Tensor]) -> Any:
    """Rebuilds the nest that ``flatten`` split."""
    kind = structure.WhichOneof("kind")
    if kind == "tensor":
        return tensors[structure.tensor]
    if kind == "tuple":
        return tuple(unflatten(node, tensors) for node in structure.tuple.items)
    if kind == "list":
        return [unflatten(node, tensors) for node in structure.list.items]
    if kind == "map":
        return {
            key: unflatten(node, tensors)
            for key, node in zip(structure.map.keys, structure.map.values, strict=True)
        }
    raise WireError(f"batch structure has an empty node ({kind=})")


def field_infos(structure: pb.Node, tensors: list[torch.Tensor]) -> list[pb.FieldInfo]:
    """Names each leaf of one item by its path ("image", "0", "inputs.ids")."""
    fields: list[pb.FieldInfo] = []

    def visit(node: pb.Node, path: str) -> None:
        kind = node.WhichOneof("kind")
        if kind == "tensor":
            tensor = tensors[node.tensor]
            fields.append(
                pb.FieldInfo(name=path, dtype=wire_dtype(tensor.dtype), shape=list(tensor.shape))
            )
        elif kind in ("tuple", "list"):
            for i, child in enumerate(getattr(node, kind).items):
                visit(child, f"{path}.{i}" if path else str(i))
        elif kind == "map":
            for key, child in zip(node.map.keys, node.map.values, strict=True):
                visit(child, f"{path}.{key}" if path else key)

    visit(structure, "")
    return fields


# -- encoding (server) --------------------------------------------------------


def aligned(offset: int) -> int:
    """``offset`` rounded up to the payload alignment (64 bytes)."""
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def layout(tensors: list[torch.Tensor]) -> tuple[list[pb.TensorMeta], int]:
    """Assigns each tensor an aligned offset; returns the metas and payload size."""
    metas = []
    offset = 0
    for tensor in tensors:
        offset = aligned(offset)
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(
            pb.TensorMeta(
                dtype=wire_dtype(tensor.dtype),
                shape=list(tensor.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset += nbytes
    return metas, offset


def header_for(
    tensors: list[torch.Tensor], structure: pb.Node
) -> tuple[pb.BatchHeader, list[pb.TensorMeta]]:
    """The header of a batch of ``tensors`` (``flatten``'s order and ``structure``),
    uncompressed, with its tensors' metas (``layout``)."""
    metas, size = layout(tensors)
    header = pb.BatchHeader(
        payload_size=size,
        raw_size=size,
        tensors=metas,
        structure=structure,
        num_samples=int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0,
    )
    return header, metas


def write_payload(
    tensors: list[torch.Tensor], metas: list[pb.TensorMeta], buffer: memoryview
) -> None:
    """Copies each tensor's bytes into ``buffer`` at its offset."""
    for tensor, meta in zip(tensors, metas, strict=True):
        if meta.nbytes == 0:
            continue
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        np.ndarray(meta.nbytes, np.uint8, buffer=buffer, offset=meta.offset)[...] = raw


class FileSlice:
    """Payload bytes that lie in a file (a worker's payload file in /dev/shm).

    ``frames`` reads them with ``preadv`` straight into the message it builds,
    instead of joining a slice of a mapping into it: one copy either way, but
    the gRPC process then never touches the mapping, so it need not populate
    and tear down page tables for every batch (benchmarks/RESULTS.md, wire
    throughput). ``owner`` (a view of the file's mapping) keeps the file from
    being recycled while the slice may still be read; when the file cannot be
    opened (the process is at its open-file limit), the same bytes are copied
    from it instead (``owner[start:start + size]``), so the stream goes on.
    """

    __slots__ = ("offset", "owner", "path", "size", "start")

    def __init__(
        self, path: str, offset: int, size: int, owner: object = None, start: int = 0
    ) -> None:
        self.path, self.offset, self.size, self.owner = path, offset, size, owner
        self.start = start  # where the slice begins in ``owner``

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> FileSlice:
        start, stop, _ = index.indices(self.size)
        return FileSlice(
            self.path, self.offset + start, max(0, stop - start), self.owner, self.start + start
        )


def _new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` and a writable view of its memory, to fill before it is used.

    grpcio sends nothing but ``bytes``; filling a fresh one in place (as C code
    does with ``PyBytes_FromStringAndSize(NULL, n)``) saves joining the parts
    into it. Nobody else sees it until it is filled.
    """
    out = _PY_BYTES(None, size)
    address = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value
    return out, memoryview((ctypes.c_char * size).from_address(address)).cast("B")


_PY_BYTES = ctypes.pythonapi.PyBytes_FromStringAndSize
_PY_BYTES.restype = ctypes.py_object
_PY_BYTES.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _join(parts: Sequence[Any]) -> bytes:
    """``b"".join(parts)``, where a part may also be a ``FileSlice`` (read with ``preadv``)."""
    if not any(isinstance(part, FileSlice) for part in parts):
        return b"".join(parts)
    total = sum(len(part) for part in parts)
    out, view = _new_bytes(total)
    files: dict[str, int] = {}
    try:
        pos = 0
        for part in parts:
            end = pos + len(part)
            if isinstance(part, FileSlice):
                try:
                    if part.path not in files:
                        files[part.path] = os.open(part.path, os.O_RDONLY)
                except OSError:  # EMFILE: no descriptor to spare, but the mapping is there
                    if not isinstance(part.owner, memoryview):
                        raise
                    view[pos:end] = part.owner[part.start : part.start + len(part)]
                else:
                    _pread_into(files[part.path], view[pos:end], part.offset, part.path)
            else:
                view[pos:end] = part
            pos = end
    finally:
        view.release()
        for fd in files.values():
            os.close(fd)
    return out


def _pread_into(fd: int, target: memoryview, offset: int, path: str) -> None:
    while len(target):
        got = os.preadv(fd, [target], offset)
        if got <= 0:
            raise WireError(f"payload file {path} ended at byte {offset}, before the batch did")
        target, offset = target[got:], offset + got


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Shared:
    """A payload that travels as a handle (a serialised ``SharedMemoryPayload``), not as bytes.

    Its length is 0: it adds no payload bytes to a message (see ``server/shm_delivery``).
    """

    __slots__ = ("handle",)

    def __init__(self, handle: bytes) -> None:
        self.handle = handle

    def __len__(self) -> int:
        return 0


def _batch_fields(header: pb.BatchHeader, piece: Any) -> list[Any]:
    """The parts of a frame that starts a batch: its header, then ``piece`` of its payload."""
    header_bytes = header.SerializeToString()
    parts: list[Any] = [_HEADER_TAG, _varint(len(header_bytes)), header_bytes]
    if isinstance(piece, Shared):
        parts += [_SHARED_TAG, _varint(len(piece.handle)), piece.handle]
    elif len(piece):
        parts += [_DATA_TAG, _varint(len(piece)), piece]
    return parts


def frames(header: pb.BatchHeader, payload: Any, chunk_bytes: int) -> Iterator[bytes]:
    """Yields the serialised ``BatchChunk`` messages of one batch.

    The first frame holds the header and the first slice of the payload; each
    frame carries at most ``chunk_bytes`` payload bytes. ``payload`` is a buffer
    or a ``FileSlice``.
    """
    if isinstance(payload, Shared):
        yield b"".join(_batch_fields(header, payload))
        return
    size = len(payload)
    count = max(1, math.ceil(size / chunk_bytes))
    for i in range(count):
        piece = payload[i * chunk_bytes : (i + 1) * chunk_bytes]
        if i == 0:
            yield _join(_batch_fields(header, piece))
        else:
            yield _join([_DATA_TAG, _varint(len(piece)), piece])


def packed_frame(batches: Sequence[tuple[pb.BatchHeader, Any]]) -> bytes:
    """One ``BatchChunk`` message holding several whole batches.

    The first batch fills the message's own fields, each next one is a
    ``packed`` entry (field 3) holding its header and whole payload: still one
    valid protobuf message, for clients that set ``max_batches_per_message``.
    """
    parts = _batch_fields(*batches[0])
    for header, payload in batches[1:]:
        fields = _batch_fields(header, payload)
        parts += [_PACKED_TAG, _varint(sum(len(part) for part in fields)), *fields]
    return _join(parts)


# -- decoding (client) --------------------------------------------------------


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint in BatchChunk frame")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


@dataclass(frozen=True, slots=True)
class Chunk:
    """A parsed ``BatchChunk``: the header if this frame starts a batch, its data, and the
    whole batches packed after it."""

    header: pb.BatchHeader | None
    data: memoryview
    packed: tuple[Chunk, ...] = ()
    shared: pb.SharedMemoryPayload | None = None
    """Where the payload lies in shared memory, instead of ``data`` (same-host delivery)."""


def parse_chunk(frame: bytes) -> Chunk:
    """Parses a ``BatchChunk`` frame without copying its data (a gRPC deserializer)."""
    return _parse(memoryview(frame))


def _parse(view: memoryview) -> Chunk:
    header: pb.BatchHeader | None = None
    data = view[0:0]
    packed: list[Chunk] = []
    shared: pb.SharedMemoryPayload | None = None
    pos = 0
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        if tag & 7 != 2:
            raise WireError(f"unexpected wire type {tag & 7} in BatchChunk frame")
        length, pos = _read_varint(view, pos)
        body = view[pos : pos + length]
        pos += length
        if tag >> 3 == 1:
            header = pb.BatchHeader.FromString(body)
        elif tag >> 3 == 2:
            data = body
        elif tag >> 3 == 3:
            packed.append(_parse(body))
        elif tag >> 3 == 4:
            shared = pb.SharedMemoryPayload.FromString(body)
        # Unknown length-delimited fields are skipped, as protobuf does.
    return Chunk(header, data, tuple(packed), shared)


def decode_tensors(header: pb.BatchHeader, payload: Any) -> list[torch.Tensor]:
    """Views each tensor of a payload buffer; no bytes are copied."""
    tensors = []
    for meta in header.tensors:
        dtype = torch_dtype(meta.dtype)
        shape = tuple(meta.shape)
        if meta.nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        numel = math.prod(shape)
        flat = torch.frombuffer(payload, dtype=dtype, count=numel, offset=meta.offset)
        tensors.append(flat.view(shape))
    return tensors


HUGE_PAGE_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


def batch_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer to reassemble a multi-chunk batch into (its tensors' memory).

    Blocks over 32 MiB always come from a fresh ``mmap`` in glibc's malloc, and
    filling a fresh ``bytearray`` of 38.5 MB faults in ~9,400 small pages (1.0-1.4
    GB/s on the benchmark machine); an anonymous map asking for transparent huge
    pages filled at 2.3-4.7 GB/s. Smaller blocks are reused from the heap
    (6 GB/s for 9.6 MB), where a fresh map per batch would be slower (1.3 GB/s).
    """
    if size < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(size)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP off: plain pages, still correct
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


class BufferPool:
    """Reassembly buffers of a stream's large batches, each reused once its tensors are gone.

    A fresh map costs as much as the copy into it: the kernel faults in and
    zeroes each new page (big's 38.5 MB huge-page map per batch). A stream's
    batches are mostly of one size and a training loop lets go of a batch a
    step or two later, so a few maps go round. A map comes back when its view
    (the batch's tensors hold it) is collected; the ``keep`` last returned wait
    for reuse by a batch of their size, older ones are let go. Smaller buffers
    come from the heap unless ``batchwire.allocator`` fixed its thresholds
    (``take``).
    """

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._free: collections.deque[bytearray | mmap.mmap] = collections.deque()  # oldest first
        # A finalizer may run in any thread, inside the cyclic GC: a queue, no lock of ours.
        self._returned: queue.SimpleQueue[bytearray | mmap.mmap] = queue.SimpleQueue()

    def take(self, size: int) -> Any:
        """A writable buffer of ``size`` bytes (contents undefined: fill all of it)."""
        if size < HUGE_PAGE_MIN_BYTES and not allocator.thresholds_fixed():
            # From the heap, freed with its batch: under glibc's adaptive thresholds that
            # free is what keeps the mmap threshold above the size of grpcio's messages,
            # so that they too come from the heap. Kept here, every 4 MiB message became
            # a fresh mmap (RemoteDataset client 0.8 -> 1.5 s/GB for imagenet). Once
            # batchwire.allocator fixed them, a kept buffer saves zeroing a new one.
            return bytearray(size)
        self._collect()
        # By position, not deque.remove: that compares bytearrays by their contents.
        at = next((i for i, kept in enumerate(self._free) if len(kept) == size), None)
        if at is None:
            buffer = batch_buffer(size)
        else:
            buffer = self._free[at]
            del self._free[at]
        view = memoryview(buffer)
        weakref.finalize(view, self._returned.put, buffer)
        return view

    def _collect(self) -> None:
        while True:
            try:
                buffer = self._returned.get_nowait()
            except queue.Empty:
                return
            # The newest stay: sizes that vary (dynamic batching) must not pin old ones.
            self._free.append(buffer)
            if len(self._free) > self._keep:
                self._free.popleft()


class BatchAssembler:
    """Joins the chunks of a stream into decoded batches.

    ``add(chunk)`` returns ``(batch_index, batch)`` when a chunk completes a
    batch, else ``None``. ``shared(handle, header)`` maps a payload that came as a
    shared-memory handle (None: a handle is an error).
    """

    def __init__(self, decompress: Any = None, shared: Any = None) -> None:
        self._decompress = decompress
        self._shared = shared
        self._header: pb.BatchHeader | None = None
        self._buffer: memoryview | None = None
        self._buffers = BufferPool()
        self._filled = 0

    def add(self, chunk: Chunk) -> tuple[int, Any] | None:
        if chunk.header is not None:
            if self._header is not None:
                raise WireError(
                    f"batch {self._header.batch_index} ended after {self._filled} of "
                    f"{self._header.payload_size} bytes"
                )
            self._header = chunk.header
            self._filled = 0
            self._buffer = None
            if chunk.shared is not None:
                if self._shared is None:
                    raise WireError(
                        f"batch {chunk.header.batch_index} came as a shared-memory handle, "
                        "which this client did not ask for"
                    )
                return self._finish(self._shared(chunk.shared, chunk.header))
            if len(chunk.data) == self._header.payload_size:
                return self._finish(chunk.data)  # one chunk: decode in place
        header = self._header
        if header is None:
            raise WireError("stream sent payload bytes before a batch header")
        if len(chunk.data):
            if self._buffer is None:
                self._buffer = self._buffers.take(header.payload_size)
            end = self._filled + len(chunk.data)
            if end > header.payload_size:
                raise WireError(
                    f"batch {header.batch_index} sent more than {header.payload_size} bytes"
                )
            self._buffer[self._filled : end] = chunk.data
            self._filled = end
        if self._filled == header.payload_size:
            return self._finish(self._buffer if self._buffer is not None else b"")
        return None

    def feed(self, chunk: Chunk) -> Iterator[tuple[pb.BatchHeader, Any]]:
        """Adds a message and the batches packed in it; yields each batch it completes
        with its header."""
        for part in (chunk, *chunk.packed):
            header = part.header or self._header
            done = self.add(part)
            if done is not None:
                assert header is not None
                yield header, done[1]

    @property
    def pending(self) -> bool:
        """True while a batch has started but not all its bytes arrived."""
        return self._header is not None

    def _finish(self, payload: Any) -> tuple[int, Any]:
        header = self._header
        assert header is not None
        self._header, self._buffer, self._filled = None, None, 0
        if header.compression != pb.NONE:
            if self._decompress is None:
                raise WireError(
                    f"batch {header.batch_index} is compressed but no codec was asked for"
                )
            payload = self._decompress(header.compression, payload, header.raw_size)
        tensors = decode_tensors(header, payload)
        return header.batch_index, unflatten(header.structure, tensors)
