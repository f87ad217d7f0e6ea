"""ForwardMany/BackwardMany messages: several small requests for one peer, and their answers part by part.

A batch request is an ``ExpertRequestBatch`` of at most `MAX_BATCH_PARTS` ordinary ``ExpertRequest`` s; the
response holds one ``ExpertResult`` per part, in order: the part's tensors, or the status it failed with (a gRPC
status code number and a message). The parts are small (at most `COALESCE_BYTES` of tensors each), and a batch
holds many of them, so the per-part work is what counts: both messages are written by hand in protobuf's own wire
format, byte for byte what ``SerializeToString`` writes (tested), one small ``bytes`` object per tensor and one join,
without a protobuf object per tensor and part; lossy tensors are embedded as the ``dmoe.v1.Tensor`` that
`serialize_tensor` makes. Decoding parses with protobuf (one call for the whole batch) and `proto.codec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from proto.codec import (
    SUPPORTED_DTYPES,
    TensorDecodeError,
    check_sendable,
    iter_tensors_from_chunks,
    raw_bytes,
    serialize_tensor,
)
from proto.contract import MAX_BATCH_PARTS
from proto.dmoe.v1 import expert_pb2
from proto.dmoe.v1.tensor_pb2 import COMPRESSION_NONE
from proto.wire import Part, WireRequest, decode_tensor, is_lossless, parse_message, varint

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_UINT64 = (1 << 64) - 1


@dataclass(slots=True)
class PartFailure:
    """Why one part of a batch failed: its gRPC status (never OK) and a message for the caller."""

    code: grpc.StatusCode
    message: str


@dataclass(slots=True)
class PartResult:
    """One part of a decoded batch response: ``failure``, or the answer's tensors (`tensors`, decoded on demand)."""

    failure: PartFailure | None
    parts: list[Part]

    def tensors(self) -> list[torch.Tensor]:
        """The answer's tensors, chunks joined and decoded; raises `TensorDecodeError` (only)."""
        return [decode_tensor(part) for part in iter_tensors_from_chunks(self.parts)]


def encode_batch_request(
    requests: Sequence[tuple[str, Sequence[torch.Tensor], int]],
    *,
    compression: int = COMPRESSION_NONE,
    response_compression: int = COMPRESSION_NONE,
) -> bytes:
    """The wire bytes of an ``ExpertRequestBatch``: one part per ``(uid, tensors, forward_id)``, in order.

    Raises ``ValueError`` for no parts or more than `MAX_BATCH_PARTS`, for a ``forward_id`` outside uint64 or a
    ``response_compression`` outside int32, and what `serialize_tensor` raises.
    """
    if not 0 < len(requests) <= MAX_BATCH_PARTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(requests)}")
    if not -(1 << 31) <= response_compression < (1 << 31):
        raise ValueError(f"response_compression must be an int32 enum value, got {response_compression}")
    tail = b"\x18" + varint(response_compression) if response_compression else b""
    out: list[bytes] = []
    for uid, tensors, forward_id in requests:
        if not 0 <= forward_id <= _UINT64:
            raise ValueError(f"forward_id must be in [0, 2**64 - 1], got {forward_id}")
        fields = [_string(1, uid)] if uid else []
        fields += [_embedded(b"\x12", _tensor(tensor, compression)) for tensor in tensors]
        if tail:
            fields.append(tail)
        if forward_id:
            fields.append(b"\x20" + varint(forward_id))
        out.append(_embedded(b"\x0a", b"".join(fields)))
    return b"".join(out)


def decode_batch_request(raw: bytes) -> list[WireRequest]:
    """The parts of an ``ExpertRequestBatch``'s wire bytes, each like a decoded unary request (tensors undecoded).

    Raises `TensorDecodeError` (only) for bytes that are not a valid ``ExpertRequestBatch`` and for a batch of no
    parts or more than `MAX_BATCH_PARTS`.
    """
    batch = parse_message(expert_pb2.ExpertRequestBatch, raw)
    if not 0 < len(batch.requests) <= MAX_BATCH_PARTS:
        raise TensorDecodeError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(batch.requests)}")
    return [
        WireRequest(part.uid, list(part.tensors), part.response_compression, part.forward_id) for part in batch.requests
    ]


def encode_batch_response(
    results: Sequence[Sequence[torch.Tensor] | PartFailure], *, compressions: Sequence[int]
) -> bytes:
    """The wire bytes of an ``ExpertResponseBatch``: per part its tensors (coded with its entry of ``compressions``,
    the part's ``response_compression``) or its `PartFailure`. Raises what `serialize_tensor` raises."""
    out: list[bytes] = []
    for result, compression in zip(results, compressions, strict=True):
        if isinstance(result, PartFailure):
            code = result.code.value[0]
            fields = (b"\x10" + varint(code) if code else b"") + (_string(3, result.message) if result.message else b"")
        else:
            response = b"".join([_embedded(b"\x0a", _tensor(tensor, compression)) for tensor in result])
            fields = _embedded(b"\x0a", response)
        out.append(_embedded(b"\x0a", fields))
    return b"".join(out)


def _embedded(tag: bytes, value: bytes) -> bytes:
    """A length-delimited field (``tag``: its one-byte key) holding ``value``."""
    return tag + varint(len(value)) + value


def _string(number: int, text: str) -> bytes:
    return _embedded(bytes(((number << 3) | 2,)), text.encode())


def _tensor(tensor: torch.Tensor, compression: int) -> bytes:
    """A ``dmoe.v1.Tensor`` message's bytes: dtype, packed shape and buffer for a lossless tensor, else
    `serialize_tensor`'s message."""
    dtype = SUPPORTED_DTYPES.get(tensor.dtype) if isinstance(tensor, torch.Tensor) else None
    if dtype is None or compression != COMPRESSION_NONE or tensor.layout != torch.strided:
        check_sendable(tensor, compression)
        if not is_lossless(tensor, compression):
            return serialize_tensor(tensor, compression).SerializeToString()
        dtype = SUPPORTED_DTYPES[tensor.dtype]
    fields = [b"\x08", varint(dtype)]
    if tensor.dim():
        fields.append(_embedded(b"\x12", b"".join([varint(dim) for dim in tensor.shape])))
    if tensor.numel():
        fields.append(_embedded(b"\x22", raw_bytes(tensor)))
    return b"".join(fields)


def decode_batch_response(raw: bytes, parts: int) -> list[PartResult]:
    """The results in an ``ExpertResponseBatch``'s wire bytes, one per part of a request of ``parts`` parts.

    A status number gRPC does not know becomes UNKNOWN. Raises `TensorDecodeError` (only) for bytes that are not a
    valid ``ExpertResponseBatch`` or hold another number of results; a part's malformed tensors raise only when
    that part's `PartResult.tensors` is called.
    """
    results = parse_message(expert_pb2.ExpertResponseBatch, raw).results
    if len(results) != parts:
        raise TensorDecodeError(f"{len(results)} results for {parts} requests")
    return [
        PartResult(
            PartFailure(_STATUS_CODES.get(result.code, grpc.StatusCode.UNKNOWN), result.message)
            if result.code
            else None,
            list(result.response.tensors),
        )
        for result in results
    ]
