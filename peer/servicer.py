"""The gRPC servicer of `dmoe.v1.ExpertService`: decode, validate, queue, encode; errors as status codes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import torch

from peer.backend import ArgSpec, ExpertBackend
from peer.batching import BatchingQueue, DeadlineExpiredError, QueueFullError
from peer.metrics import waiting_for_compute
from peer.replica_state import ExpertState
from peer.security import ClientLimiter
from proto import (
    DEFAULT_DEADLINE,
    MAX_BATCH_PARTS,
    SERVICE_NAME,
    SUPPORTED_DTYPES,
    ExpertStatus,
    Method,
    PackedBatch,
    Part,
    PartFailure,
    StreamedRequest,
    TensorDecodeError,
    TensorSpec,
    decode_batch_request,
    decode_info_request,
    decode_request,
    decode_state_request,
    decode_tensor,
    encode_batch_response,
    encode_info_response,
    encode_packed_response,
    encode_response,
    encode_state,
    encode_stream_response,
    stream_chunk_bytes,
    tensor_pb2,
)

logger = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "UNARY_METHODS", "ExpertServicer", "HostedExpert", "RequestError"]

UNARY_METHODS = (Method.FORWARD, Method.BACKWARD, Method.FORWARD_MANY, Method.BACKWARD_MANY, Method.INFO)
"""The methods with one request and one answer message: what `ExpertServicer.serve_unary` serves."""


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
    """Serves every method of `proto.Method` (Forward, Backward, their streams and batches, Info) for one peer.

    Requests arrive as bytes and are decoded here with `proto`'s decoders rather than by gRPC, so that malformed
    bytes get INVALID_ARGUMENT with a message instead of a generic error. Every refusal is a status code with a
    human-readable message and never affects other requests (in a batch, other parts). While `closing` is set,
    new work gets UNAVAILABLE. `calls` counts calls per method name, `requests` expert requests per pass.
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
        self._row_elements: int | None = None
        self.state_source: Callable[[str, int], Awaitable[ExpertState | None]] | None = None
        """Where GetState reads an expert's state: `peer.replica_sync.ReplicaSync.state` (None: refused)."""
        self.calls: dict[str, int] = {method.value: 0 for method in Method}
        self.requests = {"forward": 0, "backward": 0}  # expert requests served, batched parts included

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to register with a `grpc.aio.Server`: one per `proto.Method`, requests and answers as bytes."""
        handlers = {method.value: self._handler(method) for method in Method}
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _handler(self, method: Method) -> grpc.RpcMethodHandler:
        """The gRPC handler of one method: counts the call in `calls`, then serves it."""
        name, backward = method.value, method.backward
        if method.streaming:

            async def serve_stream(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
                self.calls[name] += 1
                async for message in self._stream(requests, context, backward=backward):
                    yield message

            return grpc.stream_stream_rpc_method_handler(serve_stream)
        if method.streams_answers:

            async def serve_state(request: bytes, context) -> AsyncIterator[bytes]:
                self.calls[name] += 1
                async for message in self._state(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(serve_state)

        async def serve(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.serve_unary(method, request, context)

        return grpc.unary_unary_rpc_method_handler(serve)

    async def serve_unary(self, method: Method, request: bytes, context) -> bytes:
        """Serve one call of a unary method (`UNARY_METHODS`): its request message's bytes in, its answer's out.

        `context` is gRPC's servicer context, or an object with the same `abort`, `time_remaining`, `peer` and
        `invocation_metadata` (the libp2p transport's, `peer.p2p_service`); refusals go through `context.abort`.
        """
        self.calls[method.value] += 1
        if method is Method.INFO:
            return await self._info(request, context)
        if method.batched:
            return await self._many(request, context, backward=method.backward)
        return await self._unary(request, context, backward=method.backward)

    async def _unary(self, request: bytes, context, *, backward: bool) -> bytes:
        try:
            message = _decoded(
                decode_request, request, "dmoe.v1.ExpertRequest"
            )  # large lossless tensors come out as views of `request`, which gRPC hands over to us
            outputs = await self._run(
                message.uid, message.parts, context, backward=backward, forward_id=message.forward_id
            )
            return encode_response(outputs, compression=message.response_compression)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _stream(self, requests: AsyncIterator[bytes], context, *, backward: bool) -> AsyncIterator[bytes]:
        try:
            stream, limit = StreamedRequest(), 0
            async for raw in requests:
                first = stream.uid is None
                _decoded(stream.add, raw, "dmoe.v1.ExpertRequest")
                if first:
                    limit = self._stream_limit(stream.uid)
                if stream.received > limit:
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"streamed request for {stream.uid} exceeds {limit} bytes ({self.max_batch_size} tokens)",
                    )
            try:
                message = stream.finish()
            except TensorDecodeError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            outputs = await self._run(
                message.uid, message.parts, context, backward=backward, forward_id=message.forward_id
            )
            chunk_bytes = stream_chunk_bytes(self.max_message_bytes)
            for raw in encode_stream_response(
                outputs, chunk_bytes=chunk_bytes, compression=message.response_compression
            ):
                yield raw
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _many(self, request: bytes, context, *, backward: bool) -> bytes:
        """Every part is checked and queued right away, in order, then all are awaited together: the experts of
        one batch become ready in one event-loop tick and are computed in one pass (`peer.compute`)."""
        try:
            batch = _decoded(decode_batch_request, request, "dmoe.v1.ExpertRequestBatch")
            is_packed, finite = isinstance(batch, PackedBatch), False
            if is_packed:
                packed, finite = self._unpacked(batch, backward)
                parts = list(zip(batch.uids, packed, batch.forward_ids, strict=True))
            else:
                parts = [(part.uid, part.parts, part.forward_id) for part in batch]
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
        client = self.limiter.client_of(context)
        deadline = _deadline(context)
        results: list[list[torch.Tensor] | PartFailure | None] = [None] * len(parts)
        queued: dict[int, asyncio.Future] = {}
        try:
            for index, (uid, tensors, forward_id) in enumerate(parts):
                try:
                    queued[index] = self._enqueue(
                        uid, tensors, client, deadline, backward, forward_id, decoded=is_packed, finite=finite
                    )
                except RequestError as exc:
                    results[index] = PartFailure(exc.code, str(exc))
            if queued:
                with waiting_for_compute():
                    outcomes = await asyncio.gather(*queued.values(), return_exceptions=True)
                for (index, _), outcome in zip(queued.items(), outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        failure = _refusal(parts[index][0], outcome)
                        outcome = PartFailure(failure.code, str(failure))
                    results[index] = outcome
        finally:
            for _ in queued:
                self.limiter.release(client)
        if is_packed:
            return encode_packed_response(_packable_results(results), compression=batch.response_compression)
        return encode_batch_response(results, compressions=[part.response_compression for part in batch])

    def _unpacked(self, batch: PackedBatch, backward: bool) -> tuple[list[list[torch.Tensor]], bool]:
        """Each part's tensors of a packed batch (views of its decoded tensors), and whether all of them are
        finite (always True for a forward: only a backward's are checked)."""
        rows = sum(batch.sizes)
        if rows > MAX_BATCH_PARTS * self.max_batch_size:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a packed batch of {rows} tokens is too large")
        tensors = []
        for index, part in enumerate(batch.parts):
            shape = tuple(part.shape)
            if not shape or shape[0] != rows:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"packed tensor {index} has shape {list(shape)} for {rows} rows"
                )
            if math.prod(shape[1:]) > self._largest_row_elements():
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"packed tensor {index} has rows of shape {list(shape[1:])}, larger than any expert here takes",
                )
            try:
                tensors.append(decode_tensor(part, max_elements=rows * math.prod(shape[1:])))
            except TensorDecodeError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"packed tensor {index}: {exc}") from None
        finite = not backward or all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        return batch.split(tensors), finite

    def _largest_row_elements(self) -> int:
        """The most elements one token of any argument of any hosted expert has."""
        if self._row_elements is None:
            specs = [
                spec
                for expert in self.experts.values()
                for spec in (*expert.backend.input_specs, *expert.backend.output_specs)
            ]
            self._row_elements = max((math.prod(spec.shape) for spec in specs), default=0)
        return self._row_elements

    def _stream_limit(self, uid: str) -> int:
        expert = self.experts.get(uid)
        if expert is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {uid!r}")
        specs = expert.backend.input_specs + expert.backend.output_specs
        bytes_per_token = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs)
        return self.max_batch_size * bytes_per_token + (1 << 20)

    async def _run(
        self, uid: str, messages: list[Part], context, *, backward: bool, forward_id: int = 0
    ) -> list[torch.Tensor]:
        client = self.limiter.client_of(context)
        future = self._enqueue(uid, messages, client, _deadline(context), backward, forward_id)
        try:
            with waiting_for_compute():
                return await future
        except Exception as exc:
            raise _refusal(uid, exc) from None
        finally:
            self.limiter.release(client)

    def _enqueue(
        self,
        uid: str,
        messages: list[Part] | list[torch.Tensor],
        client: tuple[str, str],
        deadline: float,
        backward: bool,
        forward_id: int,
        *,
        decoded: bool = False,
        finite: bool = False,
    ) -> asyncio.Future:
        """Admit, check and decode one expert request and queue it: the future of its outputs. With `decoded`,
        `messages` are the tensors of a packed part, decoded already (`finite`: checked for NaN/Inf already).

        Raises `RequestError` for a refusal; an admitted request holds a slot of `client` in the limiter until
        the caller releases it (only when this returns).
        """
        if self.closing:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "peer is shutting down; use another replica")
        self.requests["backward" if backward else "forward"] += 1
        refusal = self.limiter.admit(client)
        if refusal is not None:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            expert = self.experts.get(uid)
            if expert is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {uid!r}")
            backend = expert.backend
            specs = backend.input_specs + (backend.output_specs if backward else ())
            tensors = self._check_decoded(uid, messages, specs) if decoded else self._decode(uid, messages, specs)
            if (
                backward
                and not finite
                and not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
            ):
                backend.updates_skipped += 1
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"inputs or gradients for {uid} contain NaN/Inf; update refused"
                )
            queue = expert.backward_queue if backward else expert.forward_queue
            try:
                return queue.enqueue(tensors, deadline, forward_id=forward_id)
            except QueueFullError as exc:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except BaseException:
            self.limiter.release(client)
            raise

    def _decode(self, uid: str, messages: list[Part], specs: tuple[ArgSpec, ...]) -> list[torch.Tensor]:
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

    def _check_decoded(self, uid: str, tensors: list[torch.Tensor], specs: tuple[ArgSpec, ...]) -> list[torch.Tensor]:
        """The checks `_decode` makes, for the tensors of a packed part (decoded already, one batch size)."""
        if len(tensors) != len(specs):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"expert {uid} expects {len(specs)} tensors, got {len(tensors)}"
            )
        for index, (tensor, spec) in enumerate(zip(tensors, specs, strict=True)):
            if tensor.shape[1:] != spec.shape:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {index} for {uid} has shape {list(tensor.shape)}, expected {['batch', *spec.shape]}",
                )
            if tensor.dtype != spec.dtype:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {index} for {uid} has dtype {tensor.dtype}, expected {spec.dtype}",
                )
        if tensors[0].shape[0] > self.max_batch_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request has {tensors[0].shape[0]} tokens; this peer takes at most {self.max_batch_size} per request",
            )
        return tensors

    async def _info(self, request: bytes, context) -> bytes:
        try:
            uid = _decoded(decode_info_request, request, "dmoe.v1.InfoRequest")
            if uid and uid not in self.experts:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {uid!r}")
            uids = [uid] if uid else sorted(self.experts)
            return encode_info_response([self.expert_info(uid) for uid in uids], self.peer_id())
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def _state(self, request: bytes, context) -> AsyncIterator[bytes]:
        try:
            wanted = _decoded(decode_state_request, request, "dmoe.v1.StateRequest")
            if wanted.uid not in self.experts:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"this peer does not host expert {wanted.uid!r}")
            if self.closing or self.state_source is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "this peer does not share expert states now")
            state = await self.state_source(wanted.uid, wanted.round)
            if state is None:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no snapshot of {wanted.uid} for averaging round {wanted.round} here (clocks apart?)",
                )
            chunk_bytes = stream_chunk_bytes(self.max_message_bytes)
            for message in encode_state(state.update_count, state.tensors, chunk_bytes=chunk_bytes):
                yield message
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    def expert_info(self, uid: str) -> ExpertStatus:
        """The Info record of one hosted expert."""
        expert = self.experts[uid]
        backend = expert.backend
        forward, backward = expert.forward_queue.stats, expert.backward_queue.stats
        return ExpertStatus(
            uid=uid,
            expert_cls=backend.expert_cls,
            inputs=tuple(_spec(spec) for spec in backend.input_specs),
            outputs=tuple(_spec(spec) for spec in backend.output_specs),
            num_parameters=backend.num_parameters,
            update_count=backend.update_count,
            updates_skipped=backend.updates_skipped,
            max_batch_size=self.max_batch_size,
            queue_size=expert.queue_size,
            tokens_per_second=expert.tokens_per_second,
            batches_processed=forward.batches_processed + backward.batches_processed,
            requests_expired=forward.requests_expired + backward.requests_expired,
        )


def _deadline(context) -> float:
    """The call's deadline in `time.monotonic()` seconds (`DEFAULT_DEADLINE` from now when it has none)."""
    remaining = context.time_remaining()
    return time.monotonic() + (DEFAULT_DEADLINE if remaining is None else remaining)


def _refusal(uid: str, exc: BaseException) -> RequestError:
    """The status a request gets when its queued work failed with `exc`."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, DeadlineExpiredError):
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        return RequestError(grpc.StatusCode.UNAVAILABLE, f"expert {uid} stopped before computing this request")
    return RequestError(grpc.StatusCode.INTERNAL, f"expert {uid} failed: {exc!r}")


def _packable_results(results: list) -> list:
    """`results` with the answers that cannot join the others' packed outputs (another number, dtype or shape of
    tensors: an expert class that answers unlike its peers) turned into failures."""
    answers = [result for result in results if not isinstance(result, PartFailure)]
    if not answers:
        return results
    kinds = [(t.dtype, t.shape[1:]) for t in answers[0]]
    return [
        result
        if isinstance(result, PartFailure) or [(t.dtype, t.shape[1:]) for t in result] == kinds
        else PartFailure(grpc.StatusCode.INTERNAL, "this expert's outputs differ from the other parts'; call it alone")
        for result in results
    ]


def _decoded(decode: Callable, raw: bytes, message: str):
    """`decode(raw)`, a malformed message refused with INVALID_ARGUMENT naming the message it should have been."""
    try:
        return decode(raw)
    except TensorDecodeError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {message}: {exc}") from None


def _spec(spec: ArgSpec) -> TensorSpec:
    return TensorSpec((-1, *spec.shape), spec.dtype)


def _dtype_name(value: int) -> str:
    try:
        return tensor_pb2.DType.Name(value)
    except ValueError:
        return f"unknown dtype {value}"
