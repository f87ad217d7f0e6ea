"""gRPC calls to peers: one reused `grpc.aio` channel per endpoint, unary or chunked streams by size."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from dht.libp2p import is_libp2p_endpoint
from proto import (
    CLIENT_ID_METADATA,
    COALESCE_BYTES,
    COMPRESSION_NONE,
    DEFAULT_MAX_MESSAGE_BYTES,
    LEGACY_BATCH_PARTS,
    MAX_BATCH_PARTS,
    SWARM_KEY_METADATA,
    Method,
    NotPackableError,
    PartFailure,
    TensorDecodeError,
    decode_batch_response,
    decode_packed_response,
    decode_response,
    decode_stream_response,
    encode_batch_request,
    encode_packed_request,
    encode_request,
    encode_stream_request,
    fits_one_message,
    open_channel,
    stream_chunk_bytes,
)
from router_client.p2p_channel import P2PChannel, P2PChannels


class ExpertCallError(Exception):
    """A remote call failed: which peer, which expert, the gRPC status (if any) and why."""

    def __init__(self, endpoint: str, uid: str, reason: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{uid}@{endpoint}: {reason}")
        self.endpoint, self.uid, self.reason, self.code = endpoint, uid, reason, code


@dataclass
class _Part:
    uid: str
    tensors: list[torch.Tensor]
    forward_id: int
    future: asyncio.Future


@dataclass
class _Batch:
    endpoint: str
    backward: bool
    parts: list[_Part] = field(default_factory=list)
    timeout: float = 0.0
    size: int = 0  # tensor bytes of the parts


def _settle(future: asyncio.Future, *, result=None, exception: BaseException | None = None) -> None:
    if not future.done():
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


class ExpertTransport:
    """Sends Forward/Backward requests to peers. Must be used from a single event loop (the router's).

    Requests whose tensors fit in `max_message_bytes` go as one unary call; larger ones are chunked over
    the streaming variant. Small requests (at most `coalesce_bytes` of tensors; 0 turns this off) that are
    sent to the same peer in the same event-loop tick, like the per-expert requests of one router call,
    travel together (up to `proto.MAX_BATCH_PARTS` of them) as one ForwardMany/BackwardMany call: where a
    round trip costs more than the compute, that saves a round trip and the peer's per-call work for every
    extra expert; each request still succeeds or fails on its own. `call_many` sends a known set of requests
    to one peer the same way in one step, without a future per request (the dispatcher's first attempts).
    `compression` (a `COMPRESSION_*` value) applies to floating tensors both ways. Method names, metadata keys
    and limits come from `proto.contract`, every message's bytes from `proto`'s encoders and decoders.

    Endpoints that are libp2p multiaddrs (peers behind NAT, reached through a circuit relay) are called over
    libp2p instead (`router_client.p2p_channel`), with the same messages, metadata and status codes; their
    requests and batches are capped at what a relayed connection carries.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        compression: int = COMPRESSION_NONE,
        swarm_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        coalesce_bytes: int = COALESCE_BYTES,
    ):
        self.max_message_bytes = max_message_bytes
        self.coalesce_bytes = coalesce_bytes
        self.compression = compression
        client_id = ((CLIENT_ID_METADATA, uuid.uuid4().hex[:16]),)
        self.metadata = (((SWARM_KEY_METADATA, swarm_key),) if swarm_key else ()) + client_id
        self.credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._methods: dict[tuple[str, Method], grpc.aio.UnaryUnaryMultiCallable] = {}
        self._open_batches: dict[tuple[str, bool], _Batch] = {}
        self._no_batches: set[str] = set()  # peers that answered UNIMPLEMENTED to ForwardMany
        self._no_packing: set[str] = set()  # peers that refused a packed ForwardMany (INVALID_ARGUMENT)
        self._sending: set[asyncio.Task] = set()
        self.p2p = P2PChannels()
        """The libp2p side: its daemon starts on the first call to a libp2p endpoint."""

    def channel(self, endpoint: str) -> grpc.aio.Channel | P2PChannel:
        """The (reused) channel to `endpoint`: gRPC for ``host:port``, libp2p for a multiaddr."""
        channel = self._channels.get(endpoint)
        if channel is None:
            if is_libp2p_endpoint(endpoint):
                channel = self.p2p.channel(endpoint)
            else:
                channel = open_channel(endpoint, max_message_bytes=self.max_message_bytes, credentials=self.credentials)
            self._channels[endpoint] = channel
        return channel

    def _message_limit(self, endpoint: str) -> int:
        """The largest message to `endpoint`: the gRPC limit, or what a relayed connection carries."""
        return P2PChannel.max_message_bytes if is_libp2p_endpoint(endpoint) else self.max_message_bytes

    def _unary(self, endpoint: str, method: Method) -> grpc.aio.UnaryUnaryMultiCallable:
        """The (cached) unary multicallable of `method` at `endpoint`: bytes both ways, coded by `proto`."""
        key = (endpoint, method)
        callable_ = self._methods.get(key)
        if callable_ is None:
            callable_ = self._methods[key] = self.channel(endpoint).unary_unary(method.path)
        return callable_

    async def call(
        self,
        endpoint: str,
        uid: str,
        tensors: list[torch.Tensor],
        *,
        backward: bool,
        timeout: float,
        forward_id: int = 0,
    ) -> list[torch.Tensor]:
        """Forward (or Backward) of expert `uid` at `endpoint`; raises `ExpertCallError` on any failure.

        `forward_id` (nonzero) marks a training Forward and its Backward, so that the peer can keep the
        Forward's graph for the Backward instead of recomputing it.
        """
        if timeout <= 0:
            raise ExpertCallError(endpoint, uid, "no time left before the deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
        if self._coalescible(endpoint, tensors):
            return await self._coalesced(endpoint, uid, tensors, backward, timeout, forward_id)
        return await self._call_direct(
            endpoint, uid, tensors, backward=backward, timeout=timeout, forward_id=forward_id
        )

    async def call_many(
        self,
        endpoint: str,
        requests: list[tuple[str, list[torch.Tensor], int]],
        *,
        backward: bool,
        timeout: float,
    ) -> list[list[torch.Tensor] | ExpertCallError]:
        """Several requests ``(uid, tensors, forward_id)`` to one peer at once: per request its outputs or the
        `ExpertCallError` it failed with, in order (never raises it).

        The small ones travel together in ForwardMany/BackwardMany calls of up to `MAX_BATCH_PARTS` parts, as
        `call` would send them from one tick, but without a future per request; the others as calls of their own.
        """
        if timeout <= 0:
            reason = "no time left before the deadline"
            return [ExpertCallError(endpoint, uid, reason, grpc.StatusCode.DEADLINE_EXCEEDED) for uid, _, _ in requests]
        results: list = [None] * len(requests)
        small: list[int] = []
        coroutines = []
        for index, (uid, tensors, forward_id) in enumerate(requests):
            if self._coalescible(endpoint, tensors):
                small.append(index)
            else:
                coroutines.append(
                    self._direct_into(results, index, endpoint, uid, tensors, backward, timeout, forward_id)
                )
        if len(small) == 1:
            uid, tensors, forward_id = requests[small[0]]
            coroutines.append(
                self._direct_into(results, small[0], endpoint, uid, tensors, backward, timeout, forward_id)
            )
        elif small:
            for chunk in self._batches(endpoint, small, [_size(requests[index][1]) for index in small]):
                parts = [requests[index] for index in chunk]
                coroutines.append(self._batch_into(results, chunk, endpoint, parts, backward, timeout))
        if len(coroutines) == 1:
            await coroutines[0]
        else:
            await asyncio.gather(*coroutines)
        return results

    def _coalescible(self, endpoint: str, tensors: list[torch.Tensor]) -> bool:
        """Whether a request may travel as one part of a ForwardMany/BackwardMany to `endpoint`."""
        if not self.coalesce_bytes or endpoint in self._no_batches:
            return False
        return _size(tensors) <= min(self.coalesce_bytes, self._batch_bytes(endpoint))

    def _max_parts(self, endpoint: str) -> int:
        """Most parts in one ForwardMany/BackwardMany to `endpoint` (fewer for a peer from before packing)."""
        return LEGACY_BATCH_PARTS if endpoint in self._no_packing else MAX_BATCH_PARTS

    def _batch_bytes(self, endpoint: str) -> int:
        """Most tensor bytes in one ForwardMany/BackwardMany to `endpoint` (room left for the encoding)."""
        return int(self._message_limit(endpoint) * 0.8)

    def _batches(self, endpoint: str, indices: list[int], sizes: list[int]) -> list[list[int]]:
        """`indices` cut into batches of at most `_max_parts(endpoint)` parts and `_batch_bytes(endpoint)` bytes."""
        cap, parts, batches, current, total = self._batch_bytes(endpoint), self._max_parts(endpoint), [], [], 0
        for index, size in zip(indices, sizes, strict=True):
            if current and (len(current) >= parts or total + size > cap):
                batches.append(current)
                current, total = [], 0
            current.append(index)
            total += size
        if current:
            batches.append(current)
        return batches

    async def _direct_into(self, results, index, endpoint, uid, tensors, backward, timeout, forward_id) -> None:
        try:
            results[index] = await self._call_direct(
                endpoint, uid, tensors, backward=backward, timeout=timeout, forward_id=forward_id
            )
        except ExpertCallError as exc:
            results[index] = exc
        except Exception as exc:  # anything unexpected is this request's failure, not the others'
            results[index] = ExpertCallError(endpoint, uid, repr(exc))

    async def _batch_into(self, results, indices, endpoint, parts, backward, timeout) -> None:
        for index, outcome in zip(indices, await self._batch_call(endpoint, parts, backward, timeout), strict=True):
            results[index] = outcome

    async def _call_direct(
        self, endpoint: str, uid: str, tensors: list[torch.Tensor], *, backward: bool, timeout: float, forward_id: int
    ) -> list[torch.Tensor]:
        """One call of its own: unary, or chunked over the stream when the tensors exceed the message limit."""
        size = _size(tensors)  # an upper bound of the encoded size
        unary = fits_one_message(size, self._message_limit(endpoint))
        codes = {"compression": self.compression, "response_compression": self.compression}
        if unary:
            request = encode_request(uid, tensors, forward_id=forward_id, **codes)
        else:
            chunk_bytes = stream_chunk_bytes(self.max_message_bytes)
            requests = encode_stream_request(uid, tensors, chunk_bytes=chunk_bytes, forward_id=forward_id, **codes)
        try:
            if unary:
                method = self._unary(endpoint, Method.unary(backward))
                response = await method(request, timeout=timeout, metadata=self.metadata)
                return decode_response(response)  # gRPC's fresh bytes, handed over: the tensors are views of it
            call = self.channel(endpoint).stream_stream(Method.stream(backward).path)
            responses = call(requests, timeout=timeout, metadata=self.metadata)
            return decode_stream_response([raw async for raw in responses])
        except grpc.aio.AioRpcError as exc:
            raise ExpertCallError(endpoint, uid, f"{exc.code().name}: {exc.details()}", exc.code()) from None
        except TensorDecodeError as exc:
            raise ExpertCallError(endpoint, uid, f"malformed answer: {exc}") from None

    async def _coalesced(self, endpoint, uid, tensors, backward: bool, timeout: float, forward_id: int):
        """Join (or open) this tick's batch for (endpoint, pass); it is sent once the loop has run every ready task."""
        key = (endpoint, backward)
        batch = self._open_batches.get(key)
        size = _size(tensors)
        full = batch is not None and (
            len(batch.parts) >= self._max_parts(endpoint) or batch.size + size > self._batch_bytes(endpoint)
        )
        if batch is None or full:
            batch = self._open_batches[key] = _Batch(endpoint, backward)
            asyncio.get_running_loop().call_soon(self._flush, key, batch)
        future = asyncio.get_running_loop().create_future()
        batch.parts.append(_Part(uid, tensors, forward_id, future))
        batch.size += size
        batch.timeout = max(batch.timeout, timeout)
        return await future

    def _flush(self, key, batch: _Batch) -> None:
        if self._open_batches.get(key) is batch:
            del self._open_batches[key]
        parts = [part for part in batch.parts if not part.future.done()]  # callers cancelled meanwhile are dropped
        if len(parts) == 1:
            task = asyncio.ensure_future(self._send_alone(batch.endpoint, parts[0], batch.backward, batch.timeout))
        elif parts:
            task = asyncio.ensure_future(self._send_batch(batch.endpoint, parts, batch.backward, batch.timeout))
        else:
            return
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_alone(self, endpoint: str, part: _Part, backward: bool, timeout: float) -> None:
        try:
            outputs = await self._call_direct(
                endpoint, part.uid, part.tensors, backward=backward, timeout=timeout, forward_id=part.forward_id
            )
        except ExpertCallError as exc:
            _settle(part.future, exception=exc)
        except Exception as exc:  # anything unexpected still reaches the caller instead of leaving it waiting
            _settle(part.future, exception=ExpertCallError(endpoint, part.uid, repr(exc)))
        else:
            _settle(part.future, result=outputs)

    async def _send_batch(self, endpoint: str, parts: list[_Part], backward: bool, timeout: float) -> None:
        requests = [(part.uid, part.tensors, part.forward_id) for part in parts]
        try:
            outcomes = await self._batch_call(endpoint, requests, backward, timeout)
        except Exception as exc:  # anything unexpected still reaches the callers instead of leaving them waiting
            outcomes = [ExpertCallError(endpoint, part.uid, repr(exc)) for part in parts]
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, ExpertCallError):
                _settle(part.future, exception=outcome)
            else:
                _settle(part.future, result=outcome)

    async def _batch_call(
        self, endpoint: str, requests: list[tuple[str, list[torch.Tensor], int]], backward: bool, timeout: float
    ) -> list[list[torch.Tensor] | ExpertCallError]:
        """One ForwardMany/BackwardMany call, packed when the parts allow (`proto.batches`): per request its
        outputs or its error. A peer that does not know the method gets one call per request, one that refuses
        packed batches gets them unpacked; both are remembered."""
        uids = [uid for uid, _, _ in requests]
        packed = endpoint not in self._no_packing
        try:
            codes = {"compression": self.compression, "response_compression": self.compression}
            try:
                request = (
                    encode_packed_request(requests, **codes) if packed else encode_batch_request(requests, **codes)
                )
            except NotPackableError:
                packed = False
                request = encode_batch_request(requests, **codes)
            method = self._unary(endpoint, Method.many(backward))
            raw = await method(request, timeout=timeout, metadata=self.metadata)
            results = decode_packed_response(raw, [int(t[0].shape[0]) for _, t, _ in requests]) if packed else None
            parts = None if packed else decode_batch_response(raw, len(requests))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a peer from before batches: one call per request
                self._no_batches.add(endpoint)
                outcomes: list = [None] * len(requests)
                await asyncio.gather(
                    *(
                        self._direct_into(outcomes, i, endpoint, uid, tensors, backward, timeout, forward_id)
                        for i, (uid, tensors, forward_id) in enumerate(requests)
                    )
                )
                return outcomes
            if packed and exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests, got 0" in (exc.details() or ""):
                # a peer from before packed batches, which sees a batch of no (unpacked) parts
                self._no_packing.add(endpoint)
                chunks = [requests[i : i + LEGACY_BATCH_PARTS] for i in range(0, len(requests), LEGACY_BATCH_PARTS)]
                answers = await asyncio.gather(*(self._batch_call(endpoint, c, backward, timeout) for c in chunks))
                return [outcome for answer in answers for outcome in answer]
            reason = f"{exc.code().name}: {exc.details()}"
            return [ExpertCallError(endpoint, uid, reason, exc.code()) for uid in uids]
        except Exception as exc:  # a malformed answer, or anything unexpected: every part fails with it
            return [ExpertCallError(endpoint, uid, f"malformed answer: {exc}") for uid in uids]
        if results is not None:
            return [
                ExpertCallError(endpoint, uid, f"{result.code.name}: {result.message}", result.code)
                if isinstance(result, PartFailure)
                else result
                for uid, result in zip(uids, results, strict=True)
            ]
        outcomes = []
        for uid, result in zip(uids, parts, strict=True):
            if result.failure is not None:
                code, message = result.failure.code, result.failure.message
                outcomes.append(ExpertCallError(endpoint, uid, f"{code.name}: {message}", code))
                continue
            try:
                outcomes.append(result.tensors())
            except TensorDecodeError as exc:
                outcomes.append(ExpertCallError(endpoint, uid, f"malformed answer: {exc}"))
        return outcomes

    async def close(self) -> None:
        """Close every channel (and stop the libp2p daemon, if one started)."""
        channels, self._channels, self._methods = list(self._channels.values()), {}, {}
        for channel in channels:
            if not isinstance(channel, P2PChannel):
                await channel.close()
        await self.p2p.close()


def _size(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
