"""The dmoe wire contract: gRPC stubs for dmoe.v1 and the tensor codec."""

from proto.codec import (
    MAX_NDIM,
    SUPPORTED_DTYPES,
    TensorDecodeError,
    TensorDescriptor,
    deserialize_tensor,
    encoded_size,
    iter_tensors_from_chunks,
    join_tensor_chunks,
    serialize_tensor,
    split_tensor,
)
from proto.compression import DEFAULT_BLOCK_SIZE, FLOAT16_MAX
from proto.dmoe.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2
from proto.dmoe.v1.tensor_pb2 import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    DTYPE_BFLOAT16,
    DTYPE_BOOL,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT64,
    DTYPE_UNSPECIFIED,
)

__all__ = [
    "COMPRESSION_BLOCKWISE_8BIT",
    "COMPRESSION_FLOAT16",
    "COMPRESSION_NONE",
    "DEFAULT_BLOCK_SIZE",
    "DTYPE_BFLOAT16",
    "DTYPE_BOOL",
    "DTYPE_FLOAT16",
    "DTYPE_FLOAT32",
    "DTYPE_INT64",
    "DTYPE_UNSPECIFIED",
    "FLOAT16_MAX",
    "MAX_NDIM",
    "SUPPORTED_DTYPES",
    "TensorDecodeError",
    "TensorDescriptor",
    "deserialize_tensor",
    "encoded_size",
    "expert_pb2",
    "expert_pb2_grpc",
    "iter_tensors_from_chunks",
    "join_tensor_chunks",
    "serialize_tensor",
    "split_tensor",
    "tensor_pb2",
]
