"""A peer's calls to the other replicas of its experts: their update counts (Info) and their states (GetState)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from peer.replica_state import ExpertState
from proto import (
    CLIENT_ID_METADATA,
    SWARM_KEY_METADATA,
    Method,
    TensorDecodeError,
    channel_credentials,
    decode_info_response,
    decode_state,
    encode_info_request,
    encode_state_request,
    open_channel,
)


class StateCallError(Exception):
    """Another replica could not give its update count or state: which endpoint, which expert and why."""


class StateClient:
    """Reaches other peers for `peer.replica_sync.ReplicaSync`; one reused `grpc.aio` channel per endpoint.

    Calls carry the swarm key (when the swarm has one) and, with `tls_ca`, go over TLS (presenting
    `tls_cert`/`tls_key` for mutual TLS). A state may hold at most `max_state_bytes(uid)` bytes on the wire.
    Must be used from one event loop (the peer's).
    """

    def __init__(
        self,
        *,
        max_state_bytes: Callable[[str], int],
        max_message_bytes: int,
        swarm_key: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        self.max_state_bytes, self.max_message_bytes = max_state_bytes, max_message_bytes
        self.metadata = (((SWARM_KEY_METADATA, swarm_key),) if swarm_key else ()) + ((CLIENT_ID_METADATA, "peer"),)
        self.credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = open_channel(endpoint, max_message_bytes=self.max_message_bytes, credentials=self.credentials)
            self._channels[endpoint] = channel
        return channel

    async def update_count(self, endpoint: str, uid: str, *, timeout: float) -> int:
        """The update count of `uid` at `endpoint`; raises `StateCallError`."""
        call = self._channel(endpoint).unary_unary(Method.INFO.path)
        try:
            raw = await call(encode_info_request(uid), timeout=timeout, metadata=self.metadata)
            experts, _peer_id = decode_info_response(raw)
        except (grpc.aio.AioRpcError, TensorDecodeError) as exc:
            raise StateCallError(f"{uid}@{endpoint}: Info failed: {_reason(exc)}") from None
        for status in experts:
            if status.uid == uid:
                return status.update_count
        raise StateCallError(f"{uid}@{endpoint}: Info did not list the expert")

    async def fetch(self, endpoint: str, uid: str, round_number: int, *, timeout: float) -> ExpertState:
        """The state of `uid` at `endpoint` for `round_number` (0: now); raises `StateCallError`."""
        call = self._channel(endpoint).unary_stream(Method.GET_STATE.path)
        limit = self.max_state_bytes(uid)
        stream = call(encode_state_request(uid, round_number), timeout=timeout, metadata=self.metadata)
        try:
            messages, received = [], 0
            async for message in stream:
                received += len(message)
                if received > limit:  # a hostile peer cannot make us hold more than the state should take
                    stream.cancel()
                    raise StateCallError(f"{uid}@{endpoint}: the state is larger than the {limit} bytes expected")
                messages.append(message)
            update_count, tensors = decode_state(messages, max_bytes=limit)
        except (grpc.aio.AioRpcError, TensorDecodeError) as exc:
            raise StateCallError(f"{uid}@{endpoint}: GetState failed: {_reason(exc)}") from None
        return ExpertState(update_count, tensors)

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
