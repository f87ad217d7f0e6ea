"""Info messages: what a peer says about the experts it hosts, as typed records.

`ExpertStatus` is one ``dmoe.v1.ExpertInfo`` (schema, size, updates, load of one expert) and `TensorSpec` one
argument of its schema; `encode_info_response` / `decode_info_response` turn a list of them (and the peer's DHT
id) into the bytes of an ``InfoResponse`` and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from proto.codec import SUPPORTED_DTYPES, TensorDecodeError
from proto.dmoe.v1 import expert_pb2
from proto.wire import parse_message

_TORCH_DTYPES = {value: dtype for dtype, value in SUPPORTED_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of one argument of an expert; -1 marks the batch dimension, e.g. ``(-1, 1024)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class ExpertStatus:
    """What one expert is and how it stands: the fields of ``dmoe.v1.ExpertInfo`` and its ``LoadInfo``.

    ``queue_size`` counts requests waiting for compute, ``tokens_per_second`` is smoothed over recent batches,
    ``batches_processed`` and ``requests_expired`` (dropped past their deadline) count since start, and
    ``update_count`` survives restarts through checkpoints.
    """

    uid: str
    expert_cls: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    num_parameters: int
    update_count: int
    updates_skipped: int
    max_batch_size: int
    queue_size: int
    tokens_per_second: float
    batches_processed: int
    requests_expired: int


def encode_info_request(uid: str = "") -> bytes:
    """The wire bytes of an ``InfoRequest`` about expert ``uid`` (empty: every hosted expert)."""
    return expert_pb2.InfoRequest(uid=uid).SerializeToString()


def decode_info_request(raw: bytes) -> str:
    """The uid an ``InfoRequest``'s wire bytes ask about (empty: all); raises `TensorDecodeError` (only)."""
    return parse_message(expert_pb2.InfoRequest, raw).uid


def encode_info_response(experts: Sequence[ExpertStatus], peer_id: str = "") -> bytes:
    """The wire bytes of an ``InfoResponse`` holding ``experts`` and the peer's libp2p id (base58)."""
    return expert_pb2.InfoResponse(experts=[_info_message(e) for e in experts], peer_id=peer_id).SerializeToString()


def decode_info_response(raw: bytes) -> tuple[list[ExpertStatus], str]:
    """The experts and the peer id in an ``InfoResponse``'s wire bytes; raises `TensorDecodeError` (only)."""
    message = parse_message(expert_pb2.InfoResponse, raw)
    return [_status(info) for info in message.experts], message.peer_id


def _spec_message(spec: TensorSpec) -> expert_pb2.TensorSpec:
    return expert_pb2.TensorSpec(shape=spec.shape, dtype=SUPPORTED_DTYPES[spec.dtype])


def _spec(message: expert_pb2.TensorSpec) -> TensorSpec:
    dtype = _TORCH_DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unknown dtype {message.dtype} in an expert's schema")
    return TensorSpec(tuple(message.shape), dtype)


def _info_message(status: ExpertStatus) -> expert_pb2.ExpertInfo:
    return expert_pb2.ExpertInfo(
        uid=status.uid,
        expert_cls=status.expert_cls,
        inputs=[_spec_message(spec) for spec in status.inputs],
        outputs=[_spec_message(spec) for spec in status.outputs],
        num_parameters=status.num_parameters,
        update_count=status.update_count,
        updates_skipped=status.updates_skipped,
        max_batch_size=status.max_batch_size,
        load=expert_pb2.LoadInfo(
            queue_size=status.queue_size,
            tokens_per_second=status.tokens_per_second,
            batches_processed=status.batches_processed,
            requests_expired=status.requests_expired,
        ),
    )


def _status(info: expert_pb2.ExpertInfo) -> ExpertStatus:
    return ExpertStatus(
        uid=info.uid,
        expert_cls=info.expert_cls,
        inputs=tuple(_spec(spec) for spec in info.inputs),
        outputs=tuple(_spec(spec) for spec in info.outputs),
        num_parameters=info.num_parameters,
        update_count=info.update_count,
        updates_skipped=info.updates_skipped,
        max_batch_size=info.max_batch_size,
        queue_size=info.load.queue_size,
        tokens_per_second=info.load.tokens_per_second,
        batches_processed=info.load.batches_processed,
        requests_expired=info.load.requests_expired,
    )
