"""Client side of the libp2p transport: calls to peers that are reachable only through a circuit relay.

`P2PChannels` owns one p2pd daemon per client (started on the first call to a libp2p endpoint, on the router's
event loop) and one `P2PChannel` per endpoint. A channel looks like a `grpc.aio` channel to `ExpertTransport`:
``channel.unary_unary(path)`` is a callable ``(request, timeout=, metadata=) -> answer`` over the same request
and answer bytes, failing with the same `grpc.aio.AioRpcError` status codes (the peer's, or UNAVAILABLE and
DEADLINE_EXCEEDED for the path itself), so deadlines, failover, bans, hedging and metrics work unchanged.

A relay resets each relayed connection after `RELAY_CIRCUIT_BYTES` in either direction or `RELAY_CIRCUIT_SECONDS`
(`dht.libp2p`). A channel counts what its connection carried and, before a call would cross a limit, waits for
the calls in flight on it and opens a new one; a call that finds its connection reset anyway is sent once more
on a new one while its deadline allows. A request that cannot fit in one relayed connection
(`RELAYED_MESSAGE_BYTES`) fails at once with RESOURCE_EXHAUSTED, so the router uses another replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from hivemind.p2p import P2P, PeerID

from dht.libp2p import RELAY_CIRCUIT_BYTES, RELAY_CIRCUIT_SECONDS, connect, disconnect, endpoint_peer_id, start_p2p
from proto import CLIENT_ID_METADATA, DEFAULT_DEADLINE, SWARM_KEY_METADATA
from proto.dmoe.v1.p2p_pb2 import P2PRequest, P2PResponse

logger = logging.getLogger(__name__)

CALL_OVERHEAD_BYTES = 1 << 10
"""What one call adds on a relayed connection besides its messages (stream set-up, framing, encryption), bounded."""
CIRCUIT_BUDGET_BYTES = RELAY_CIRCUIT_BYTES - (24 << 10)
"""Bytes a channel lets one relayed connection carry each way; the rest is left for libp2p's own messages."""
RELAYED_MESSAGE_BYTES = CIRCUIT_BUDGET_BYTES // 2 - CALL_OVERHEAD_BYTES
"""The largest request (and answer) the relayed path carries."""

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _too_large(what: str) -> grpc.aio.AioRpcError:
    return _error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} is too large for a relayed connection (a relay carries at most {RELAYED_MESSAGE_BYTES} bytes)",
    )


class P2PChannels:
    """The libp2p endpoints one client calls: their channels and the one p2pd daemon they share."""

    def __init__(self) -> None:
        self._channels: dict[str, P2PChannel] = {}
        self._daemon: asyncio.Task | None = None

    def channel(self, endpoint: str) -> P2PChannel:
        """The (reused) channel to the libp2p `endpoint`."""
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = P2PChannel(self, endpoint)
        return channel

    async def daemon(self) -> P2P:
        """The client's p2pd daemon, started on first use."""
        if self._daemon is None:
            self._daemon = asyncio.ensure_future(self._start())
        try:
            return await asyncio.shield(self._daemon)
        except Exception as exc:
            self._daemon = None
            raise _error(grpc.StatusCode.UNAVAILABLE, f"cannot start the libp2p daemon: {exc}") from None

    async def _start(self) -> P2P:
        started = time.monotonic()
        p2p = await start_p2p()
        logger.info("libp2p daemon for relayed peers started in %.2f s", time.monotonic() - started)
        return p2p

    async def close(self) -> None:
        """Stop the daemon (if it started)."""
        daemon, self._daemon, self._channels = self._daemon, None, {}
        if daemon is not None:
            try:
                p2p = await daemon
            except Exception:
                p2p = None
            if p2p is not None:
                await p2p.shutdown()


class P2PChannel:
    """Calls to one libp2p endpoint, over relayed connections it renews before the relay would reset them."""

    max_message_bytes = RELAYED_MESSAGE_BYTES
    """The largest request this channel sends as one message."""

    def __init__(self, channels: P2PChannels, endpoint: str):
        self.channels, self.endpoint = channels, endpoint
        self.peer_id = PeerID.from_base58(endpoint_peer_id(endpoint))
        self._connected = False
        self._opened = 0.0
        self._sent = self._received = 0  # bytes this connection carried (or will, for calls in flight), each way
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self.connections = 0
        """Relayed connections opened so far (a new one per used-up or reset one)."""

    def unary_unary(self, path: str):
        """The callable of the unary method at gRPC path `path`, as `grpc.aio.Channel.unary_unary` gives it."""
        return functools.partial(self._call, path)

    def stream_stream(self, path: str):
        """Chunked streams carry requests too large for a relayed connection: refused."""

        def refuse(requests, timeout=None, metadata=None):
            raise _too_large("a request over the message limit")

        return refuse

    async def _call(self, path: str, request: bytes, *, timeout: float | None = None, metadata=()) -> bytes:
        size = len(request) + CALL_OVERHEAD_BYTES
        if len(request) > RELAYED_MESSAGE_BYTES:
            raise _too_large(f"a request of {len(request)} bytes")
        deadline = time.monotonic() + (timeout if timeout is not None else DEFAULT_DEADLINE)
        fields = dict(metadata or ())
        envelope = P2PRequest(
            message=request,
            swarm_key=fields.get(SWARM_KEY_METADATA, ""),
            client_id=fields.get(CLIENT_ID_METADATA, ""),
        )
        for attempt in range(2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed on the relayed path")
            envelope.timeout = remaining
            try:
                async with asyncio.timeout(remaining):
                    p2p = await self.channels.daemon()
                    await self._take(p2p, size)
                    try:
                        answer = await p2p.call_protobuf_handler(self.peer_id, path, envelope, P2PResponse)
                    finally:
                        self._release()
            except TimeoutError:
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer through the relay in time") from None
            except grpc.aio.AioRpcError:
                raise
            except Exception as exc:  # a reset or expired circuit, a relay that is gone: try once more on a new one
                self._connected = False
                if attempt == 0 and deadline - time.monotonic() > 0:
                    logger.debug("relayed call to %s failed (%r); retrying on a new connection", self.endpoint, exc)
                    continue
                raise _error(grpc.StatusCode.UNAVAILABLE, f"relayed call failed: {exc}") from None
            self._received += len(answer.message) - len(request)  # the answer was booked at the request's size
            if answer.code:
                raise _error(_STATUS_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.details)
            return answer.message
        raise AssertionError("unreachable")  # pragma: no cover

    async def _take(self, p2p: P2P, size: int) -> None:
        """Book `size` bytes each way on the current connection, first replacing it when they would not fit."""
        async with self._lock:
            while self._connected and not self._fits(size):
                if self._in_flight == 0:
                    await self._drop(p2p)
                    break
                self._idle.clear()
                await self._idle.wait()
            if not self._connected:
                await connect(p2p, self.endpoint)
                self._connected, self._opened = True, time.monotonic()
                self._sent = self._received = 0
                self.connections += 1
            self._sent += size
            self._received += size
            self._in_flight += 1

    def _fits(self, size: int) -> bool:
        young = time.monotonic() - self._opened < RELAY_CIRCUIT_SECONDS * 0.8
        budget = CIRCUIT_BUDGET_BYTES
        return young and self._sent + size <= budget and self._received + size <= budget

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def _drop(self, p2p: P2P) -> None:
        self._connected = False
        try:
            await disconnect(p2p, self.endpoint)
        except Exception as exc:
            logger.debug("closing the used-up relayed connection to %s failed: %r", self.endpoint, exc)
