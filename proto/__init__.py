"""The dmoe wire contract: names and limits, the generated stubs of dmoe.v1, and every message's encoder/decoder.

- `proto.contract`: service and method names (`Method`, `method_path`), metadata keys, the limits both sides
  share. Needs no torch.
- One encode/decode entry point per message, used by peers and clients alike: `encode_request` /
  `decode_request` and `encode_response` / `decode_response` (unary Forward/Backward, `proto.wire`),
  ``*_batch_*`` (ForwardMany/BackwardMany, `proto.batches`), ``*_stream_*`` and `StreamedRequest` (chunked
  streams, `proto.streams`), ``*_info_*`` (Info, `proto.info`), ``*_state*`` (GetState, `proto.state`).
  Every malformed message raises `TensorDecodeError`.
- The tensor codec (`serialize_tensor`, `deserialize_tensor`, chunking) and lossy compression underneath.

Names are imported on first use (PEP 562), so ``import proto.contract`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "proto.contract": (
        "CLIENT_ID_METADATA",
        "COALESCE_BYTES",
        "COMPRESSION_NAMES",
        "DEFAULT_DEADLINE",
        "DEFAULT_MAX_MESSAGE_BYTES",
        "HEALTH_SERVICE",
        "LEGACY_BATCH_PARTS",
        "MAX_BATCH_PARTS",
        "OPEN_SERVICES",
        "SERVICE_NAME",
        "SWARM_KEY_METADATA",
        "Method",
        "fits_one_message",
        "method_path",
        "stream_chunk_bytes",
    ),
    "proto.codec": (
        "MAX_NDIM",
        "SUPPORTED_DTYPES",
        "TensorDecodeError",
        "TensorDescriptor",
        "deserialize_tensor",
        "encoded_size",
        "iter_tensors_from_chunks",
        "join_tensor_chunks",
        "serialize_tensor",
        "split_tensor",
    ),
    "proto.compression": ("DEFAULT_BLOCK_SIZE", "FLOAT16_MAX"),
    "proto.wire": (
        "Part",
        "RawTensor",
        "WireRequest",
        "decode_request",
        "decode_response",
        "decode_tensor",
        "encode_request",
        "encode_response",
    ),
    "proto.batches": (
        "NotPackableError",
        "PackedBatch",
        "PartFailure",
        "PartResult",
        "decode_batch_request",
        "decode_batch_response",
        "decode_packed_response",
        "encode_batch_request",
        "encode_batch_response",
        "encode_packed_request",
        "encode_packed_response",
        "packable",
    ),
    "proto.streams": ("StreamedRequest", "decode_stream_response", "encode_stream_request", "encode_stream_response"),
    "proto.channels": ("channel_credentials", "open_channel"),
    "proto.state": ("StateRequest", "decode_state", "decode_state_request", "encode_state", "encode_state_request"),
    "proto.info": (
        "ExpertStatus",
        "TensorSpec",
        "decode_info_request",
        "decode_info_response",
        "encode_info_request",
        "encode_info_response",
    ),
    "proto.dmoe.v1.tensor_pb2": (
        "COMPRESSION_BLOCKWISE_8BIT",
        "COMPRESSION_FLOAT16",
        "COMPRESSION_NONE",
        "DTYPE_BFLOAT16",
        "DTYPE_BOOL",
        "DTYPE_FLOAT16",
        "DTYPE_FLOAT32",
        "DTYPE_INT64",
        "DTYPE_UNSPECIFIED",
    ),
}
_MODULES = {
    "expert_pb2": "proto.dmoe.v1.expert_pb2",
    "expert_pb2_grpc": "proto.dmoe.v1.expert_pb2_grpc",
    "tensor_pb2": "proto.dmoe.v1.tensor_pb2",
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_HOME, *_MODULES])


def __getattr__(name: str) -> Any:
    """Import a public name (or generated module) of `proto` when it is first used."""
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    else:
        raise AttributeError(f"module 'proto' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, imported or not."""
    return sorted({*globals(), *__all__})
