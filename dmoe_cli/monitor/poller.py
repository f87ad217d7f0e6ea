"""How the monitor looks at a swarm: the DHT listing of one grid, then an Info call to every listed peer at once.

`SwarmPoller.poll()` makes one `Poll`; `poll_forever` feeds polls into a `SwarmTracker` every `period` seconds,
and at once when a peer's connection drops (a killed peer shows as unreachable without waiting for the next
period).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from dht import ExpertDirectory
from dht.libp2p import is_libp2p_endpoint
from dmoe_cli.monitor.state import Poll, SwarmTracker, replicas_by_endpoint
from proto import (
    CLIENT_ID_METADATA,
    SWARM_KEY_METADATA,
    Method,
    TensorDecodeError,
    channel_credentials,
    decode_info_response,
    encode_info_request,
    open_channel,
)
from router_client.p2p_channel import P2PChannels

logger = logging.getLogger(__name__)

MIN_POLL_GAP = 0.2
"""Seconds between two polls at least, however often connections drop."""


class SwarmPoller:
    """Looks at the experts of grid `prefix` through `directory` and asks each listed peer for its Info.

    One `grpc.aio` channel is kept per listed endpoint (closed once the endpoint is no longer listed). Every Info
    call has `info_timeout` seconds, the DHT listing `dht_timeout`. Calls carry `swarm_key` when given and go
    over TLS with `tls_ca`. After an endpoint answers, its channel is watched: when the connection drops,
    `on_disconnect()` is called (from the event loop). Use from one event loop.
    """

    def __init__(
        self,
        directory: ExpertDirectory,
        prefix: str,
        *,
        dht_timeout: float = 10.0,
        info_timeout: float = 1.5,
        swarm_key: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ):
        self.directory, self.prefix = directory, prefix
        self.dht_timeout, self.info_timeout = dht_timeout, info_timeout
        self.metadata = (((SWARM_KEY_METADATA, swarm_key),) if swarm_key else ()) + ((CLIENT_ID_METADATA, "monitor"),)
        self.credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self.on_disconnect = on_disconnect
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._p2p = P2PChannels()  # relayed peers (behind NAT) answer Info over libp2p

    async def poll(self) -> Poll:
        """One look at the swarm; never raises for an unreachable DHT or peer (the `Poll` says what failed)."""
        at = time.time()
        try:
            listing = await self.directory.list_experts(
                self.prefix, use_cache=False, timeout=self.dht_timeout, return_future=True
            )
        except Exception as exc:  # DHTUnavailableError, or a DHT that answers nonsense: shown, never fatal
            logger.warning("could not list the experts under %r: %s", self.prefix, exc)
            return Poll(at, None, dht_error=f"{type(exc).__name__}: {exc}")
        endpoints = sorted(replicas_by_endpoint(listing))
        await self._close_channels(set(self._channels) - set(endpoints))
        poll = Poll(at, listing)
        results = await asyncio.gather(*(self._info(endpoint) for endpoint in endpoints))
        for endpoint, (statuses, peer_id, error) in zip(endpoints, results, strict=True):
            if error is None:
                poll.answers[endpoint], poll.peer_ids[endpoint] = statuses, peer_id
            else:
                poll.failures[endpoint] = error
        return poll

    async def _info(self, endpoint: str) -> tuple[list, str, str | None]:
        if is_libp2p_endpoint(endpoint):
            channel = self._p2p.channel(endpoint)
        else:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = open_channel(endpoint, credentials=self.credentials)
        call = channel.unary_unary(Method.INFO.path)
        try:
            raw = await call(encode_info_request(), timeout=self.info_timeout, metadata=self.metadata)
            statuses, peer_id = decode_info_response(raw)
        except grpc.aio.AioRpcError as exc:
            # gRPC's details end with the cause ("...: Connection refused"); the page shows that much
            return [], "", f"{exc.code().name}: {(exc.details() or '').rsplit(': ', 1)[-1]}"
        except TensorDecodeError as exc:
            return [], "", f"a malformed Info answer: {exc}"
        if not is_libp2p_endpoint(endpoint):
            self._watch(endpoint, channel)
        return statuses, peer_id, None

    def _watch(self, endpoint: str, channel: grpc.aio.Channel) -> None:
        watcher = self._watchers.get(endpoint)
        if self.on_disconnect is None or (watcher is not None and not watcher.done()):
            return
        self._watchers[endpoint] = asyncio.ensure_future(self._wait_for_drop(channel))

    async def _wait_for_drop(self, channel: grpc.aio.Channel) -> None:
        if channel.get_state() is not grpc.ChannelConnectivity.READY:
            return
        await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        if self.on_disconnect is not None:
            self.on_disconnect()

    async def _close_channels(self, endpoints: set[str]) -> None:
        for endpoint in endpoints:
            watcher = self._watchers.pop(endpoint, None)
            if watcher is not None:
                watcher.cancel()
            channel = self._channels.pop(endpoint, None)
            if channel is not None:
                await channel.close()

    async def close(self) -> None:
        """Stop watching and close every channel (and the libp2p daemon, if relayed peers needed one)."""
        await self._close_channels(set(self._channels) | set(self._watchers))
        await self._p2p.close()


async def poll_forever(poller: SwarmPoller, tracker: SwarmTracker, period: float) -> None:
    """Poll every `period` seconds into `tracker`, and soon after a watched connection drops; runs until cancelled."""
    wake = asyncio.Event()
    poller.on_disconnect = wake.set
    while True:
        started = time.monotonic()
        wake.clear()
        tracker.update(await poller.poll())
        await asyncio.sleep(MIN_POLL_GAP)
        try:
            await asyncio.wait_for(wake.wait(), timeout=max(0.0, period - (time.monotonic() - started)))
        except TimeoutError:
            pass
