"""ForwardMany/BackwardMany messages: several small requests for one peer, and their answers part by part.

A batch request is an ``ExpertRequestBatch`` of at most `MAX_BATCH_PARTS` ordinary ``ExpertRequest`` s; the
response holds one ``ExpertResult`` per part, in order: the part's tensors, or the status it failed with (a gRPC
status code number and a message). The parts are small (at most `COALESCE_BYTES` of tensors each), and a batch
holds many of them, so the per-part work is what counts: both messages are written by hand in protobuf's own wire
format, byte for byte what ``SerializeToString`` writes (tested), one small ``bytes`` object per tensor and one join,
without a protobuf object per tensor and part; lossy tensors are embedded as the ``dmoe.v1.Tensor`` that
`serialize_tensor` makes. Decoding parses with protobuf (one call for the whole batch) and `proto.codec`.

Parts whose tensors agree on dtype and on every dimension but the batch size (a router's parts for experts of one
class always do) travel packed instead (``ExpertRequestBatch.packed``): per argument one tensor holding every
part's rows, with the parts' uids, batch sizes and forward ids beside it, and the answer likewise
(``ExpertResponseBatch.packed``: per part a status, per output one tensor of the rows of the parts that succeeded).
That is a handful of tensors per call whatever the number of parts: `encode_packed_request`, `decode_batch_request`
(which returns a `PackedBatch` for those), `encode_packed_response`, `decode_packed_response`.
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


class NotPackableError(ValueError):
    """Parts that cannot travel packed (see `packable`): they go as an ordinary batch."""


@dataclass(slots=True)
class PackedBatch:
    """A decoded packed ``ExpertRequestBatch``: per part its uid, batch size and forward id, and per argument the
    (undecoded) tensor holding the rows of every part, in order."""

    uids: list[str]
    sizes: list[int]
    forward_ids: list[int]
    parts: list[Part]
    response_compression: int = COMPRESSION_NONE

    def split(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each part's tensors: its rows of every (decoded) packed tensor, as views."""
        pieces = [torch.split(tensor, self.sizes) for tensor in tensors]
        return [list(row) for row in zip(*pieces, strict=True)]


def packable(requests: Sequence[tuple[str, Sequence[torch.Tensor], int]]) -> bool:
    """Whether these parts may travel packed: each holds tensors of one batch size, and all agree on the number of
    tensors and on each one's dtype and dimensions but the first."""
    first = requests[0][1]
    if not first or any(t.dim() == 0 for t in first):
        return False
    kinds = [(t.dtype, t.shape[1:]) for t in first]
    for _, tensors, _ in requests:
        if len(tensors) != len(kinds):
            return False
        rows = tensors[0].shape[0]
        for tensor, (dtype, rest) in zip(tensors, kinds, strict=True):
            if tensor.dtype != dtype or tensor.dim() == 0 or tensor.shape[0] != rows or tensor.shape[1:] != rest:
                return False
    return True


def encode_packed_request(
    requests: Sequence[tuple[str, Sequence[torch.Tensor], int]],
    *,
    compression: int = COMPRESSION_NONE,
    response_compression: int = COMPRESSION_NONE,
) -> bytes:
    """The wire bytes of a packed ``ExpertRequestBatch`` of the parts ``(uid, tensors, forward_id)``, which must be
    `packable`: each argument's tensors joined into one. Byte for byte what protobuf writes.

    Raises `NotPackableError` (a ``ValueError``) for parts that are not packable, ``ValueError`` for no parts or
    more than `MAX_BATCH_PARTS`, a ``forward_id`` outside uint64 or a ``response_compression`` outside int32, and
    what `serialize_tensor` raises.
    """
    if not 0 < len(requests) <= MAX_BATCH_PARTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(requests)}")
    if not packable(requests):
        raise NotPackableError("packed parts must agree on their tensors' dtypes and dimensions but the batch size")
    if not -(1 << 31) <= response_compression < (1 << 31):
        raise ValueError(f"response_compression must be an int32 enum value, got {response_compression}")
    forward_ids = [forward_id for _, _, forward_id in requests]
    if not all(0 <= forward_id <= _UINT64 for forward_id in forward_ids):
        raise ValueError(f"forward_id must be in [0, 2**64 - 1], got {forward_ids}")
    fields = [_string(1, uid) for uid, _, _ in requests]
    fields.append(_packed_varints(b"\x12", [int(tensors[0].shape[0]) for _, tensors, _ in requests]))
    if any(forward_ids):
        fields.append(_packed_varints(b"\x1a", forward_ids))
    joined = [torch.cat(column) for column in zip(*(tensors for _, tensors, _ in requests), strict=True)]
    fields += [_embedded(b"\x22", _tensor(tensor, compression)) for tensor in joined]
    if response_compression:
        fields.append(b"\x28" + varint(response_compression))
    return _embedded(b"\x12", b"".join(fields))


def decode_batch_request(raw: bytes) -> list[WireRequest] | PackedBatch:
    """The parts of an ``ExpertRequestBatch``'s wire bytes, each like a decoded unary request (tensors undecoded);
    a `PackedBatch` for a packed one.

    Raises `TensorDecodeError` (only) for bytes that are not a valid ``ExpertRequestBatch``, for a batch of no
    parts or more than `MAX_BATCH_PARTS`, and for a packed batch whose lists disagree on the number of parts.
    """
    batch = parse_message(expert_pb2.ExpertRequestBatch, raw)
    if batch.HasField("packed"):
        return _packed_batch(batch)
    if not 0 < len(batch.requests) <= MAX_BATCH_PARTS:
        raise TensorDecodeError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(batch.requests)}")
    return [
        WireRequest(part.uid, list(part.tensors), part.response_compression, part.forward_id) for part in batch.requests
    ]


def _packed_batch(batch) -> PackedBatch:
    if batch.requests:
        raise TensorDecodeError("a batch sets requests or packed, not both")
    packed = batch.packed
    uids, sizes, forward_ids = list(packed.uids), list(packed.sizes), list(packed.forward_ids)
    if not 0 < len(uids) <= MAX_BATCH_PARTS:
        raise TensorDecodeError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(uids)}")
    if len(sizes) != len(uids) or len(forward_ids) not in (0, len(uids)):
        raise TensorDecodeError(
            f"a packed batch of {len(uids)} uids has {len(sizes)} sizes and {len(forward_ids)} forward ids"
        )
    if not all(sizes):
        raise TensorDecodeError("a packed part of no rows")
    return PackedBatch(uids, sizes, forward_ids or [0] * len(uids), list(packed.tensors), packed.response_compression)


def encode_packed_response(
    results: Sequence[Sequence[torch.Tensor] | PartFailure], *, compression: int = COMPRESSION_NONE
) -> bytes:
    """The wire bytes of the ``ExpertResponseBatch`` answering a packed batch: per part its `PartFailure` or its
    tensors (which must agree as `packable` says; joined per output). Raises what `serialize_tensor` raises."""
    codes, messages, outputs = [], [], []
    for result in results:
        if isinstance(result, PartFailure):
            codes.append(result.code.value[0])
            messages.append(result.message)
        else:
            codes.append(0)
            messages.append("")
            outputs.append(result)
    fields = [_packed_varints(b"\x0a", codes)]
    fields += [_string(2, message) for message in messages]
    if outputs:
        joined = [torch.cat(column) for column in zip(*outputs, strict=True)]
        fields += [_embedded(b"\x1a", _tensor(tensor, compression)) for tensor in joined]
    return _embedded(b"\x12", b"".join(fields))


def decode_packed_response(raw: bytes, sizes: Sequence[int]) -> list[list[torch.Tensor] | PartFailure]:
    """The answer to a packed request whose parts had `sizes` rows: per part its tensors (views of the decoded
    packed outputs) or its `PartFailure`. Raises `TensorDecodeError` (only) for bytes that are not such an answer:
    not packed, another number of parts, or outputs whose rows are not those of the parts that succeeded."""
    response = parse_message(expert_pb2.ExpertResponseBatch, raw)
    if not response.HasField("packed"):
        raise TensorDecodeError("the answer to a packed batch is not packed")
    packed = response.packed
    codes, messages = list(packed.codes), list(packed.messages)
    if len(codes) != len(sizes) or len(messages) != len(sizes):
        raise TensorDecodeError(f"{len(codes)} results for {len(sizes)} requests")
    ok_sizes = [size for size, code in zip(sizes, codes, strict=True) if not code]
    tensors = [decode_tensor(part) for part in packed.tensors]
    rows = sum(ok_sizes)
    if ok_sizes and (not tensors or any(t.dim() == 0 or t.shape[0] != rows for t in tensors)):
        raise TensorDecodeError(f"packed outputs of {[tuple(t.shape) for t in tensors]} for {rows} rows")
    pieces = iter(zip(*(torch.split(t, ok_sizes) for t in tensors), strict=True)) if ok_sizes else iter(())
    return [
        PartFailure(_STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN), message) if code else list(next(pieces))
        for code, message in zip(codes, messages, strict=True)
    ]


def _packed_varints(tag: bytes, values: Sequence[int]) -> bytes:
    return _embedded(tag, b"".join([varint(value) for value in values]))


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
