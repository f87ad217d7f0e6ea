"""ForwardStream/BackwardStream messages: requests and responses too large for one message, in chunks.

Each message of a stream is an ordinary ``ExpertRequest`` (or ``ExpertResponse``) whose tensors are chunks made by
`split_tensor`, in order; the first request message alone carries ``uid``, ``response_compression`` and
``forward_id``. A receiver joins the chunks back into whole tensors (`join_tensor_chunks` rules: a later chunk
carries no metadata, the count is the first chunk's).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from proto.codec import TensorDecodeError, iter_tensors_from_chunks, serialize_tensor, split_tensor
from proto.dmoe.v1 import expert_pb2, tensor_pb2
from proto.dmoe.v1.tensor_pb2 import COMPRESSION_NONE
from proto.wire import WireRequest, decode_tensor, parse_message


def encode_stream_request(
    uid: str,
    tensors: Sequence[torch.Tensor],
    *,
    chunk_bytes: int,
    compression: int = COMPRESSION_NONE,
    response_compression: int = COMPRESSION_NONE,
    forward_id: int = 0,
) -> Iterator[bytes]:
    """The wire bytes of each message of a stream request, chunks of at most ``chunk_bytes`` of payload each.

    The tensors are encoded at once, so this raises what `serialize_tensor` raises before the first message; the
    chunks are cut as the messages are consumed.
    """
    messages = [serialize_tensor(t, compression) for t in tensors]
    return _request_messages(uid, messages, chunk_bytes, response_compression, forward_id)


def _request_messages(
    uid: str, messages: list[tensor_pb2.Tensor], chunk_bytes: int, response_compression: int, forward_id: int
) -> Iterator[bytes]:
    first = True
    for message in messages:
        for part in split_tensor(message, chunk_bytes):
            if first:
                request = expert_pb2.ExpertRequest(
                    uid=uid, tensors=[part], response_compression=response_compression, forward_id=forward_id
                )
                first = False
            else:
                request = expert_pb2.ExpertRequest(tensors=[part])
            yield request.SerializeToString()


class StreamedRequest:
    """The messages of one stream request as they arrive (`add`), then the whole request (`finish`).

    ``uid``, ``response_compression`` and ``forward_id`` come from the first message; ``received`` counts the
    bytes added so far, so that a receiver can refuse a stream that grows beyond what it accepts. Chunks are
    kept as protobuf messages until `finish` joins them.
    """

    def __init__(self) -> None:
        self.uid: str | None = None
        self.response_compression = COMPRESSION_NONE
        self.forward_id = 0
        self.received = 0
        self._chunks: list[tensor_pb2.Tensor] = []

    def add(self, raw: bytes) -> None:
        """Take the wire bytes of the next message; raises `TensorDecodeError` (only) for bytes that are not one."""
        message = parse_message(expert_pb2.ExpertRequest, raw)
        if self.uid is None:
            self.uid, self.response_compression, self.forward_id = (
                message.uid,
                message.response_compression,
                message.forward_id,
            )
        self.received += len(raw)
        self._chunks.extend(message.tensors)

    def finish(self) -> WireRequest:
        """The whole request, chunks joined (tensors undecoded, as `decode_request` leaves them).

        Raises `TensorDecodeError` for an empty stream and for chunks that do not join (prefixed
        ``bad tensor chunks: ``).
        """
        if self.uid is None:
            raise TensorDecodeError("empty request stream")
        try:
            parts = list(iter_tensors_from_chunks(self._chunks))
        except TensorDecodeError as exc:
            raise TensorDecodeError(f"bad tensor chunks: {exc}") from None
        self._chunks = []
        return WireRequest(self.uid, parts, self.response_compression, self.forward_id)


def encode_stream_response(
    tensors: Iterable[torch.Tensor], *, chunk_bytes: int, compression: int = COMPRESSION_NONE
) -> Iterator[bytes]:
    """The wire bytes of each message of a stream response, chunks of at most ``chunk_bytes`` of payload each.

    Lazy: each tensor is encoded when its first message is consumed (raising what `serialize_tensor` raises).
    """
    for tensor in tensors:
        for part in split_tensor(serialize_tensor(tensor, compression), chunk_bytes):
            yield expert_pb2.ExpertResponse(tensors=[part]).SerializeToString()


def decode_stream_response(messages: Iterable[bytes]) -> list[torch.Tensor]:
    """The tensors of a stream response from the wire bytes of its messages, in order.

    Raises `TensorDecodeError` (only) for a message that is not an ``ExpertResponse`` or chunks that do not join.
    """
    chunks = [part for raw in messages for part in parse_message(expert_pb2.ExpertResponse, raw).tensors]
    return [decode_tensor(part) for part in iter_tensors_from_chunks(chunks)]
