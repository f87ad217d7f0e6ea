from proto.dmoe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertRequest(_message.Message):
    __slots__ = ("uid", "tensors", "response_compression", "forward_id")
    UID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    response_compression: _tensor_pb2.Compression
    forward_id: int
    def __init__(self, uid: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., response_compression: _Optional[_Union[_tensor_pb2.Compression, str]] = ..., forward_id: _Optional[int] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class ExpertRequestBatch(_message.Message):
    __slots__ = ("requests", "packed")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ExpertRequest]
    packed: PackedRequests
    def __init__(self, requests: _Optional[_Iterable[_Union[ExpertRequest, _Mapping]]] = ..., packed: _Optional[_Union[PackedRequests, _Mapping]] = ...) -> None: ...

class PackedRequests(_message.Message):
    __slots__ = ("uids", "sizes", "forward_ids", "tensors", "response_compression")
    UIDS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    uids: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    forward_ids: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    response_compression: _tensor_pb2.Compression
    def __init__(self, uids: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[int]] = ..., forward_ids: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., response_compression: _Optional[_Union[_tensor_pb2.Compression, str]] = ...) -> None: ...

class ExpertResult(_message.Message):
    __slots__ = ("response", "code", "message")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    response: ExpertResponse
    code: int
    message: str
    def __init__(self, response: _Optional[_Union[ExpertResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ExpertResponseBatch(_message.Message):
    __slots__ = ("results", "packed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExpertResult]
    packed: PackedResults
    def __init__(self, results: _Optional[_Iterable[_Union[ExpertResult, _Mapping]]] = ..., packed: _Optional[_Union[PackedResults, _Mapping]] = ...) -> None: ...

class PackedResults(_message.Message):
    __slots__ = ("codes", "messages", "tensors")
    CODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    codes: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, codes: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class LoadInfo(_message.Message):
    __slots__ = ("queue_size", "tokens_per_second", "batches_processed", "requests_expired")
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BATCHES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    queue_size: int
    tokens_per_second: float
    batches_processed: int
    requests_expired: int
    def __init__(self, queue_size: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., batches_processed: _Optional[int] = ..., requests_expired: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("uid", "expert_cls", "inputs", "outputs", "num_parameters", "update_count", "load", "max_batch_size", "updates_skipped")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_cls: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_parameters: int
    update_count: int
    load: LoadInfo
    max_batch_size: int
    updates_skipped: int
    def __init__(self, uid: _Optional[str] = ..., expert_cls: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_parameters: _Optional[int] = ..., update_count: _Optional[int] = ..., load: _Optional[_Union[LoadInfo, _Mapping]] = ..., max_batch_size: _Optional[int] = ..., updates_skipped: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("experts", "peer_id")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    peer_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., peer_id: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("uid", "round")
    UID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    uid: str
    round: int
    def __init__(self, uid: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("update_count", "name", "tensor")
    UPDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    update_count: int
    name: str
    tensor: _tensor_pb2.Tensor
    def __init__(self, update_count: _Optional[int] = ..., name: _Optional[str] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
