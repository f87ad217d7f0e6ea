"""GetState messages: one expert's state (named tensors and an update count) streamed in chunks.

A request names the uid and the averaging round (`StateRequest`). The answer is a stream of ``StateChunk``
messages: the tensors in order, each cut by `split_tensor` into chunks of at most ``chunk_bytes`` of payload;
the first chunk of each tensor carries its name, the first message of the stream the update count. Tensors
travel losslessly (replicas must agree to the bit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from proto.codec import TensorDecodeError, iter_tensors_from_chunks, serialize_tensor, split_tensor
from proto.dmoe.v1 import expert_pb2
from proto.wire import decode_tensor, parse_message


@dataclass(frozen=True)
class StateRequest:
    """Which expert's state is wanted, and from which averaging round (0: as it is now)."""

    uid: str
    round: int = 0


def encode_state_request(uid: str, round_number: int = 0) -> bytes:
    """The wire bytes of a ``StateRequest``."""
    return expert_pb2.StateRequest(uid=uid, round=round_number).SerializeToString()


def decode_state_request(raw: bytes) -> StateRequest:
    """A ``StateRequest`` from its wire bytes; raises `TensorDecodeError` (only) for bytes that are not one."""
    message = parse_message(expert_pb2.StateRequest, raw)
    return StateRequest(message.uid, message.round)


def encode_state(update_count: int, tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int) -> Iterator[bytes]:
    """The wire bytes of each message of a GetState answer (lazily: one tensor is encoded at a time)."""
    first = True
    for name, tensor in tensors.items():
        for index, part in enumerate(split_tensor(serialize_tensor(tensor), chunk_bytes)):
            message = expert_pb2.StateChunk(name=name if index == 0 else "", tensor=part)
            if first:
                message.update_count, first = update_count, False
            yield message.SerializeToString()
    if first:  # a state without tensors still tells its update count
        yield expert_pb2.StateChunk(update_count=update_count).SerializeToString()


def decode_state(messages: Iterable[bytes], *, max_bytes: int) -> tuple[int, dict[str, torch.Tensor]]:
    """(update count, tensors by name) of a GetState answer.

    Raises `TensorDecodeError` (only) for messages that are not ``StateChunk`` s, chunks that do not join, names
    missing, repeated or out of place, or more than ``max_bytes`` of messages in all (checked as they arrive).
    """
    update_count, names, chunks, received = 0, [], [], 0
    for index, raw in enumerate(messages):
        received += len(raw)
        if received > max_bytes:
            raise TensorDecodeError(f"the state is larger than the {max_bytes} bytes expected")
        message = parse_message(expert_pb2.StateChunk, raw)
        if index == 0:
            update_count = message.update_count
        if message.name:
            names.append(message.name)
        if message.HasField("tensor"):
            chunks.append(message.tensor)
    tensors = [decode_tensor(part) for part in iter_tensors_from_chunks(chunks)]
    if len(tensors) != len(names) or len(set(names)) != len(names):
        raise TensorDecodeError(f"a state of {len(tensors)} tensors came with the names {names[:8]}")
    return update_count, dict(zip(names, tensors, strict=True))
