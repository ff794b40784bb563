from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[Compression]
    LZ4: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
BOOL: DType
NONE: Compression
LZ4: Compression
ZSTD: Compression

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class FieldInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "length", "fields", "source", "transforms", "sampler", "fingerprint", "replica")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    fields: _containers.RepeatedCompositeFieldContainer[FieldInfo]
    source: str
    transforms: _containers.RepeatedScalarFieldContainer[str]
    sampler: SamplerSpec
    fingerprint: str
    replica: str
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[FieldInfo, _Mapping]]] = ..., source: _Optional[str] = ..., transforms: _Optional[_Iterable[str]] = ..., sampler: _Optional[_Union[SamplerSpec, _Mapping]] = ..., fingerprint: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("dataset", "batch_size", "shuffle", "seed", "epoch", "rank", "world_size", "drop_last", "start_batch", "end_batch", "batch_stride", "compression", "sampler", "max_batches_per_message", "trainer_report", "start_sample", "fingerprint", "shared_memory_nonce")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    START_BATCH_FIELD_NUMBER: _ClassVar[int]
    END_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_STRIDE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHES_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_REPORT_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_NONCE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    batch_size: int
    shuffle: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    drop_last: bool
    start_batch: int
    end_batch: int
    batch_stride: int
    compression: Compression
    sampler: SamplerSpec
    max_batches_per_message: int
    trainer_report: TrainerReport
    start_sample: int
    fingerprint: str
    shared_memory_nonce: bytes
    def __init__(self, dataset: _Optional[str] = ..., batch_size: _Optional[int] = ..., shuffle: _Optional[bool] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., drop_last: _Optional[bool] = ..., start_batch: _Optional[int] = ..., end_batch: _Optional[int] = ..., batch_stride: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., sampler: _Optional[_Union[SamplerSpec, _Mapping]] = ..., max_batches_per_message: _Optional[int] = ..., trainer_report: _Optional[_Union[TrainerReport, _Mapping]] = ..., start_sample: _Optional[int] = ..., fingerprint: _Optional[str] = ..., shared_memory_nonce: _Optional[bytes] = ...) -> None: ...

class TrainerReport(_message.Message):
    __slots__ = ("wait_seconds", "compute_seconds", "batches")
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    compute_seconds: float
    batches: int
    def __init__(self, wait_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., batches: _Optional[int] = ...) -> None: ...

class SamplerSpec(_message.Message):
    __slots__ = ("kind", "num_samples", "without_replacement", "max_tokens", "max_items")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    num_samples: int
    without_replacement: bool
    max_tokens: int
    max_items: int
    def __init__(self, kind: _Optional[str] = ..., num_samples: _Optional[int] = ..., without_replacement: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., max_items: _Optional[int] = ...) -> None: ...

class BatchCount(_message.Message):
    __slots__ = ("num_batches", "num_samples", "sampler")
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    num_batches: int
    num_samples: int
    sampler: str
    def __init__(self, num_batches: _Optional[int] = ..., num_samples: _Optional[int] = ..., sampler: _Optional[str] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("tensor", "tuple", "list", "map")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    tuple: NodeList
    list: NodeList
    map: NodeMap
    def __init__(self, tensor: _Optional[int] = ..., tuple: _Optional[_Union[NodeList, _Mapping]] = ..., list: _Optional[_Union[NodeList, _Mapping]] = ..., map: _Optional[_Union[NodeMap, _Mapping]] = ...) -> None: ...

class NodeList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, items: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class NodeMap(_message.Message):
    __slots__ = ("keys", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("batch_index", "payload_size", "tensors", "structure", "compression", "raw_size", "num_samples", "build_seconds", "wait_seconds")
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_index: int
    payload_size: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    structure: Node
    compression: Compression
    raw_size: int
    num_samples: int
    build_seconds: float
    wait_seconds: float
    def __init__(self, batch_index: _Optional[int] = ..., payload_size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., structure: _Optional[_Union[Node, _Mapping]] = ..., compression: _Optional[_Union[Compression, str]] = ..., raw_size: _Optional[int] = ..., num_samples: _Optional[int] = ..., build_seconds: _Optional[float] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class BatchChunk(_message.Message):
    __slots__ = ("header", "data", "packed", "shared_memory")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    header: BatchHeader
    data: bytes
    packed: _containers.RepeatedCompositeFieldContainer[BatchChunk]
    shared_memory: SharedMemoryPayload
    def __init__(self, header: _Optional[_Union[BatchHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., packed: _Optional[_Iterable[_Union[BatchChunk, _Mapping]]] = ..., shared_memory: _Optional[_Union[SharedMemoryPayload, _Mapping]] = ...) -> None: ...

class SharedMemoryPayload(_message.Message):
    __slots__ = ("path", "offset", "release_path", "slot", "seq")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PATH_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    release_path: str
    slot: int
    seq: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., release_path: _Optional[str] = ..., slot: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class SharedMemoryOfferRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedMemoryOfferResponse(_message.Message):
    __slots__ = ("path", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...
