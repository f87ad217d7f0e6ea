"""ForwardMany/BackwardMany messages: several small requests for one peer, and their answers part by part.

A batch request is an ``ExpertRequestBatch`` of at most `MAX_BATCH_PARTS` ordinary ``ExpertRequest`` s; the
response holds one ``ExpertResult`` per part, in order: the part's tensors, or the status it failed with (a gRPC
status code number and a message). The parts are small (at most `COALESCE_BYTES` of tensors each), so they go
through protobuf objects and `proto.codec`, not the raw path of `proto.wire`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from proto.codec import TensorDecodeError, iter_tensors_from_chunks, serialize_tensor
from proto.contract import MAX_BATCH_PARTS
from proto.dmoe.v1 import expert_pb2
from proto.dmoe.v1.tensor_pb2 import COMPRESSION_NONE
from proto.wire import Part, WireRequest, decode_tensor, parse_message

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


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

    Raises ``ValueError`` for no parts or more than `MAX_BATCH_PARTS`, and what `serialize_tensor` raises.
    """
    if not 0 < len(requests) <= MAX_BATCH_PARTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(requests)}")
    return expert_pb2.ExpertRequestBatch(
        requests=[
            expert_pb2.ExpertRequest(
                uid=uid,
                tensors=[serialize_tensor(t, compression) for t in tensors],
                response_compression=response_compression,
                forward_id=forward_id,
            )
            for uid, tensors, forward_id in requests
        ]
    ).SerializeToString()


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
    messages = []
    for result, compression in zip(results, compressions, strict=True):
        if isinstance(result, PartFailure):
            messages.append(expert_pb2.ExpertResult(code=result.code.value[0], message=result.message))
        else:
            tensors = [serialize_tensor(t, compression) for t in result]
            messages.append(expert_pb2.ExpertResult(response=expert_pb2.ExpertResponse(tensors=tensors)))
    return expert_pb2.ExpertResponseBatch(results=messages).SerializeToString()


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
