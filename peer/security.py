"""Who may call a peer, and how much: the swarm key, TLS credentials and per-client limits.

- Swarm key: every call must carry the metadata `proto.SWARM_KEY_METADATA` (``dmoe-swarm-key``) equal to the
  peer's key (compared in constant time); otherwise UNAUTHENTICATED. The services of `proto.OPEN_SERVICES`
  (the health service) stay open so orchestrators can probe.
- TLS: `server_credentials(cert, key, ca)`; with a CA, clients must present a certificate it signed (mTLS).
- Per-client limits (`ClientLimiter`): concurrent requests and a token-bucket request rate per client,
  so that a flood from one client cannot starve the others (RESOURCE_EXHAUSTED when exceeded).
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from proto.contract import CLIENT_ID_METADATA, OPEN_SERVICES, SWARM_KEY_METADATA, Method

_REFUSAL = f"missing or wrong swarm key ({SWARM_KEY_METADATA})"


def resolve_swarm_key(key: str | None) -> str | None:
    """The swarm key to use: the given one, else `DMOE_SWARM_KEY`, else None (an open swarm)."""
    return key if key else os.environ.get("DMOE_SWARM_KEY") or None


class SwarmKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the right swarm key with UNAUTHENTICATED (health checks excepted)."""

    def __init__(self, swarm_key: str):
        self._expected = swarm_key.encode()

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

        self._refusals = {
            "unary_unary": grpc.unary_unary_rpc_method_handler(refuse),
            "stream_stream": grpc.stream_stream_rpc_method_handler(_refuse_stream),
            "unary_stream": grpc.unary_stream_rpc_method_handler(_refuse_stream),
        }

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        """Let the call through when its metadata carries the swarm key."""
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SWARM_KEY_METADATA:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return await continuation(handler_call_details)
                break
        known = Method.from_path(method)
        if known is not None and known.streaming:
            return self._refusals["stream_stream"]
        return self._refusals["unary_stream" if known is not None and known.streams_answers else "unary_unary"]


async def _refuse_stream(requests, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
    yield b""  # pragma: no cover - abort raises


def server_credentials(cert: str, key: str, ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials of a peer; with `ca`, clients must present a certificate signed by it (mutual TLS)."""
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


class ClientLimiter:
    """Per-client admission, so that a flood from one client cannot starve the others.

    A client is its address (from `context.peer()`, port excluded) plus the `CLIENT_ID_METADATA` it announces
    (one random id per router process). Each client may have `max_concurrent` requests in flight and send
    `rate` requests/s (token bucket, burst `2·rate`; 0 disables it); one address altogether may have
    `4 · max_concurrent` in flight, so inventing ids buys little. Refusals become RESOURCE_EXHAUSTED.
    """

    PER_ADDRESS_FACTOR = 4

    def __init__(self, *, max_concurrent: int, rate: float):
        self.max_concurrent, self.rate = max_concurrent, rate
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    @staticmethod
    def client_of(context) -> tuple[str, str]:
        """(address, client) of the caller: its address without the port, and address plus announced id."""
        peer = context.peer() or "unknown"
        address = peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer
        client_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_ID_METADATA:
                client_id = str(value)[:64]
                break
        return address, f"{address}/{client_id}"

    def admit(self, caller: tuple[str, str]) -> str | None:
        """Take a slot for `caller`; returns why it is refused, or None when admitted."""
        address, client = caller
        if self._in_flight.get(client, 0) >= self.max_concurrent:
            return f"client has {self.max_concurrent} requests in flight (the per-client limit)"
        if self._in_flight.get(address, 0) >= self.PER_ADDRESS_FACTOR * self.max_concurrent:
            return f"address {address} has too many requests in flight"
        if self.rate > 0:
            now = time.monotonic()
            tokens, last = self._buckets.get(client, (2 * self.rate, now))
            tokens = min(2 * self.rate, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return f"client exceeds {self.rate:g} requests/s (the per-client rate limit)"
            self._buckets[client] = (tokens - 1, now)
        for key in caller:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def release(self, caller: tuple[str, str]) -> None:
        """Give back the slot taken by `admit`."""
        for key in caller:
            left = self._in_flight.get(key, 1) - 1
            if left:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
