"""The gRPC servicer of `dmoe.v1.ExpertService`: decode, validate, queue, encode; errors as status codes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from peer.backend import ArgSpec, ExpertBackend
from peer.batching import BatchingQueue, DeadlineExpiredError, QueueFullError
from peer.security import ClientLimiter
from proto import (
    TensorDecodeError,
    expert_pb2,
    iter_tensors_from_chunks,
    serialize_tensor,
    split_tensor,
)
from proto.codec import SUPPORTED_DTYPES
from proto.wire import decode_request, decode_tensor, encode_response

logger = logging.getLogger(__name__)

SERVICE_NAME = "dmoe.v1.ExpertService"
DEFAULT_DEADLINE = 120.0  # seconds given to a call that arrives without a deadline
MAX_BATCH_PARTS = 256  # most expert requests in one ForwardMany/BackwardMany


class RequestError(Exception):
    """A request the servicer refuses; carries the gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class HostedExpert:
    """A backend with its two batching queues (forward and backward)."""

    def __init__(self, backend: ExpertBackend, forward_queue: BatchingQueue, backward_queue: BatchingQueue):
        self.backend, self.forward_queue, self.backward_queue = backend, forward_queue, backward_queue

    @property
    def queue_size(self) -> int:
        """Requests waiting for compute, forward and backward together."""
        return len(self.forward_queue) + len(self.backward_queue)

    @property
    def tokens_per_second(self) -> float:
        """Smoothed tokens/s over forward and backward."""
        return self.forward_queue.stats.tokens_per_second + self.backward_queue.stats.tokens_per_second


class ExpertServicer:
    """Serves Forward, Backward (unary and chunked streams) and Info for the experts of one peer.

    Requests are parsed here rather than by gRPC, so that malformed bytes get INVALID_ARGUMENT with a
    message instead of a generic error. Every refusal is a status code with a human-readable message and
    never affects other requests. While `closing` is set, new work gets UNAVAILABLE.
    """

    def __init__(
        self,
        experts: dict[str, HostedExpert],
        *,
        max_batch_size: int,
        max_message_bytes: int,
        limiter: ClientLimiter | None = None,
        peer_id: Callable[[], str] = lambda: "",
    ):
        self.experts = experts
        self.limiter = limiter or ClientLimiter(max_concurrent=1 << 30, rate=0)
        self.max_batch_size = max_batch_size
        self.max_message_bytes = max_message_bytes
        self.peer_id = peer_id
        self.closing = False
        self.calls = {
            "Forward": 0,
            "Backward": 0,
            "ForwardStream": 0,
            "BackwardStream": 0,
            "ForwardMany": 0,
            "BackwardMany": 0,
            "Info": 0,
        }
        self.requests = {"forward": 0, "backward": 0}  # expert requests served, batched parts included

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to register with a `grpc.aio.Server` (requests arrive as raw bytes)."""
        handlers = {
            "Forward": grpc.unary_unary_rpc_method_handler(self._forward),
            "Backward": grpc.unary_unary_rpc_method_handler(self._backward),
            "ForwardStream": grpc.stream_stream_rpc_method_handler(self._forward_stream),
            "BackwardStream": grpc.stream_stream_rpc_method_handler(self._backward_stream),
            "ForwardMany": grpc.unary_unary_rpc_method_handler(self._forward_many),
            "BackwardMany": grpc.unary_unary_rpc_method_handler(self._backward_many),
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def _forward(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls["Forward"] += 1
        return await self._unary(request, context, backward=False)

    async def _backward(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls["Backward"] += 1
        return await self._unary(request, context, backward=True)

    async def _forward_many(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls["ForwardMany"] += 1
        return await self._many(request, context, backward=False)

    async def _backward_many(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls["BackwardMany"] += 1
        return await self._many(request, context, backward=True)

    async def _forward_stream(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        self.calls["ForwardStream"] += 1
        async for message in self._stream(requests, context, backward=False):
            yield message

    async def _backward_stream(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        self.calls["BackwardStream"] += 1
        async for message in self._stream(requests, context, backward=True):
            yield message

    async def _unary(self, request: bytes, context, *, backward: bool) -> bytes:
        try:
            try:  # large lossless tensors come out as views of `request`, which gRPC hands over to us
                message = decode_request(request)
            except TensorDecodeError as exc:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid dmoe.v1.ExpertRequest: {exc}"
                ) from None
            outputs = await self._run(
                message.uid, message.parts, context, backward=backward, forward_id=message.forward_id
            )
            return encode_response(outputs, compression=message.response_compression)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _stream(self, requests: AsyncIterator[bytes], context, *, backward: bool) -> AsyncIterator[bytes]:
        try:
            uid, compression, forward_id, chunks, received, limit = None, 0, 0, [], 0, 0
            async for raw in requests:
                message = _parse(expert_pb2.ExpertRequest, raw)
                if uid is None:
                    uid, compression, forward_id = message.uid, message.response_compression, message.forward_id
                    limit = self._stream_limit(uid)
                received += len(raw)
                if received > limit:
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"streamed request for {uid} exceeds {limit} bytes ({self.max_batch_size} tokens)",
                    )
                chunks.extend(message.tensors)
            if uid is None:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
            try:
                tensors = list(iter_tensors_from_chunks(chunks))
            except TensorDecodeError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad tensor chunks: {exc}") from None
            outputs = await self._run(uid, tensors, context, backward=backward, forward_id=forward_id)
            chunk_bytes = max(1, self.max_message_bytes // 2)
            for output in outputs:
                for part in split_tensor(serialize_tensor(output, compression), chunk_bytes):
                    yield expert_pb2.ExpertResponse(tensors=[part]).SerializeToString()
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _many(self, request: bytes, context, *, backward: bool) -> bytes:
        try:
            batch = _parse(expert_pb2.ExpertRequestBatch, request)
            if not 0 < len(batch.requests) <= MAX_BATCH_PARTS:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a batch holds 1 to {MAX_BATCH_PARTS} requests, got {len(batch.requests)}",
                )
            parts = [self._part(part, context, backward=backward) for part in batch.requests]
            results = await asyncio.gather(*parts)
            return expert_pb2.ExpertResponseBatch(results=results).SerializeToString()
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _part(self, part, context, *, backward: bool) -> expert_pb2.ExpertResult:
        """One part of a ForwardMany/BackwardMany: its answer, or the status it failed with (never raises)."""
        try:
            outputs = await self._run(
                part.uid, list(part.tensors), context, backward=backward, forward_id=part.forward_id
            )
        except RequestError as exc:
            return expert_pb2.ExpertResult(code=exc.code.value[0], message=str(exc))
        tensors = [serialize_tensor(t, part.response_compression) for t in outputs]
        return expert_pb2.ExpertResult(response=expert_pb2.ExpertResponse(tensors=tensors))

    def _stream_limit(self, uid: str) -> int:
        expert = self.experts.get(uid)
        if expert is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {uid!r}")
        specs = expert.backend.input_specs + expert.backend.output_specs
        bytes_per_token = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs)
        return self.max_batch_size * bytes_per_token + (1 << 20)

    async def _run(
        self, uid: str, messages: list, context, *, backward: bool, forward_id: int = 0
    ) -> list[torch.Tensor]:
        if self.closing:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "peer is shutting down; use another replica")
        self.requests["backward" if backward else "forward"] += 1
        client = self.limiter.client_of(context)
        refusal = self.limiter.admit(client)
        if refusal is not None:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            return await self._run_admitted(uid, messages, context, backward=backward, forward_id=forward_id)
        finally:
            self.limiter.release(client)

    async def _run_admitted(
        self, uid: str, messages: list, context, *, backward: bool, forward_id: int
    ) -> list[torch.Tensor]:
        expert = self.experts.get(uid)
        if expert is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {uid!r}")
        backend = expert.backend
        specs = backend.input_specs + (backend.output_specs if backward else ())
        tensors = self._decode(uid, messages, specs)
        if backward and not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            backend.updates_skipped += 1
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"inputs or gradients for {uid} contain NaN/Inf; update refused"
            )
        remaining = context.time_remaining()
        deadline = time.monotonic() + (DEFAULT_DEADLINE if remaining is None else remaining)
        queue = expert.backward_queue if backward else expert.forward_queue
        try:
            return await queue.submit(tensors, deadline, tag=forward_id)
        except QueueFullError as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except DeadlineExpiredError as exc:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except Exception as exc:
            raise RequestError(grpc.StatusCode.INTERNAL, f"expert {uid} failed: {exc!r}") from None

    def _decode(self, uid: str, messages: list, specs: tuple[ArgSpec, ...]) -> list[torch.Tensor]:
        if len(messages) != len(specs):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"expert {uid} expects {len(specs)} tensors, got {len(messages)}"
            )
        tensors = []
        batch_size = None
        for index, (message, spec) in enumerate(zip(messages, specs, strict=True)):
            shape = tuple(message.shape)
            if len(shape) != len(spec.shape) + 1 or shape[1:] != spec.shape:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {index} for {uid} has shape {list(shape)}, expected {['batch', *spec.shape]}",
                )
            if message.dtype != SUPPORTED_DTYPES[spec.dtype]:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {index} for {uid} has dtype {_dtype_name(message.dtype)}, expected {spec.dtype}",
                )
            if batch_size is None:
                batch_size = shape[0]
            if shape[0] != batch_size:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensors for {uid} disagree on the batch size: {shape[0]} vs {batch_size}",
                )
            if batch_size <= 0:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"empty batch for {uid}")
            if batch_size > self.max_batch_size:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request has {batch_size} tokens; this peer takes at most {self.max_batch_size} per request",
                )
            try:  # a protobuf `Tensor` or a `proto.wire.RawTensor`, checked alike
                tensor = decode_tensor(message, max_elements=batch_size * math.prod(spec.shape))
            except TensorDecodeError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor {index} for {uid}: {exc}") from None
            tensors.append(tensor)
        return tensors

    async def _info(self, request: bytes, context) -> bytes:
        self.calls["Info"] += 1
        try:
            message = _parse(expert_pb2.InfoRequest, request)
            if message.uid and message.uid not in self.experts:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {message.uid!r}")
            uids = [message.uid] if message.uid else sorted(self.experts)
            infos = [self.expert_info(uid) for uid in uids]
            return expert_pb2.InfoResponse(experts=infos, peer_id=self.peer_id()).SerializeToString()
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    def expert_info(self, uid: str) -> expert_pb2.ExpertInfo:
        """The Info record of one hosted expert."""
        expert = self.experts[uid]
        backend = expert.backend
        forward, backward = expert.forward_queue.stats, expert.backward_queue.stats
        return expert_pb2.ExpertInfo(
            uid=uid,
            expert_cls=backend.expert_cls,
            inputs=[_spec_message(spec) for spec in backend.input_specs],
            outputs=[_spec_message(spec) for spec in backend.output_specs],
            num_parameters=backend.num_parameters,
            update_count=backend.update_count,
            updates_skipped=backend.updates_skipped,
            max_batch_size=self.max_batch_size,
            load=expert_pb2.LoadInfo(
                queue_size=expert.queue_size,
                tokens_per_second=expert.tokens_per_second,
                batches_processed=forward.batches_processed + backward.batches_processed,
                requests_expired=forward.requests_expired + backward.requests_expired,
            ),
        )


def _parse(message_cls, data: bytes):
    try:
        return message_cls.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {message_cls.DESCRIPTOR.full_name}: {exc}"
        ) from None


def _spec_message(spec: ArgSpec):
    return expert_pb2.TensorSpec(shape=[-1, *spec.shape], dtype=SUPPORTED_DTYPES[spec.dtype])


def _dtype_name(value: int) -> str:
    from proto.dmoe.v1 import tensor_pb2

    try:
        return tensor_pb2.DType.Name(value)
    except ValueError:
        return f"unknown dtype {value}"
