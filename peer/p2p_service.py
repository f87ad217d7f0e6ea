"""The peer's second transport: its ExpertService over libp2p, reachable through circuit relays (behind NAT).

A peer whose gRPC port nobody can reach (`--reachability private`) keeps a reservation on public relays (the
swarm's `dmoe dht` nodes, by default its `--initial-peers`) and serves Forward, Backward, ForwardMany,
BackwardMany and Info as libp2p protocols named by their gRPC paths. Each call is a `dmoe.v1.P2PRequest` whose
`message` is the very request gRPC would carry, answered by a `dmoe.v1.P2PResponse` with the answer or a gRPC
status code: the same `ExpertServicer` decodes, checks, queues and encodes both transports' calls, with the
same per-client limits (a client is its libp2p peer id, which libp2p authenticates, plus its announced id),
message-size limit and swarm key. Requests too large for a relayed connection never reach it; the chunked
stream methods and GetState stay gRPC-only.

Before the peer announces, `RelayedService` checks each relayed endpoint from a client daemon of its own and
announces the first that answers; `watch` re-checks it and moves to another relay when it stops answering.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from dht.libp2p import circuit_endpoint, connect, disconnect, endpoint_peer_id, start_p2p
from peer.servicer import UNARY_METHODS, ExpertServicer
from proto import CLIENT_ID_METADATA, Method, encode_info_request
from proto.dmoe.v1.p2p_pb2 import P2PRequest, P2PResponse

logger = logging.getLogger(__name__)

_REFUSAL = "missing or wrong swarm key"


class RelayUnavailableError(RuntimeError):
    """No relay took this peer: it cannot be reached, so it does not announce its experts."""


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class P2PCallContext:
    """What `ExpertServicer` reads of a gRPC servicer context, for a call that arrived over libp2p."""

    def __init__(self, remote_peer_id: str, client_id: str, timeout: float):
        self._peer = f"p2p:{remote_peer_id}"
        self._metadata = ((CLIENT_ID_METADATA, client_id),) if client_id else ()
        self._deadline = time.monotonic() + timeout if timeout > 0 else None

    def peer(self) -> str:
        """The caller: ``p2p:<its libp2p peer id>`` (no port: the per-address limit applies per peer id)."""
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The caller's announced client id, as gRPC metadata would carry it."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None: it gave none)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with status `code` (raises, as gRPC's abort does)."""
        raise _Aborted(code, details)


def serve_over_p2p(
    servicer: ExpertServicer, *, swarm_key: str | None, max_message_bytes: int
) -> dict[Method, Callable[[P2PRequest, P2PContext], Awaitable[P2PResponse]]]:
    """The libp2p handler of each method of `UNARY_METHODS`, serving it with `servicer`."""
    expected = swarm_key.encode() if swarm_key else None

    def handler(method: Method):
        async def handle(request: P2PRequest, context: P2PContext) -> P2PResponse:
            if expected is not None and not hmac.compare_digest(request.swarm_key.encode(), expected):
                return _failure(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
            if len(request.message) > max_message_bytes:
                return _failure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request of {len(request.message)} bytes exceeds this peer's limit of {max_message_bytes}",
                )
            call = P2PCallContext(context.remote_id.to_base58(), request.client_id[:64], request.timeout)
            try:
                return P2PResponse(message=await servicer.serve_unary(method, request.message, call))
            except _Aborted as exc:
                return _failure(exc.code, exc.details)
            except Exception as exc:  # a bug must not become an opaque libp2p error
                logger.exception("libp2p %s call failed", method.value)
                return _failure(grpc.StatusCode.INTERNAL, f"{method.value} failed: {exc!r}")

        return handle

    return {method: handler(method) for method in UNARY_METHODS}


def _failure(code: grpc.StatusCode, details: str) -> P2PResponse:
    return P2PResponse(code=code.value[0], details=details)


class RelayedService:
    """Serves `servicer` over libp2p through `relays` and finds the relayed endpoint clients can reach.

    `start()` starts the daemon, registers the handlers and returns the first relayed endpoint that answers a
    call from a client daemon of this peer's own (raises `RelayUnavailableError` naming the relays when none does
    before `timeout`). `watch(on_change)` re-checks that endpoint every `check_every` s and, when it stops answering,
    moves to another relay and calls ``on_change(new_endpoint)``.
    """

    def __init__(
        self,
        servicer: ExpertServicer,
        relays: Sequence[str],
        *,
        swarm_key: str | None,
        max_message_bytes: int,
        identity_path: str | None = None,
        check_every: float = 15.0,
    ):
        if not relays:
            raise ValueError(
                "--reachability private needs relays: pass --initial-peers (every `dmoe dht` node relays) or --relays"
            )
        self.servicer, self.relays = servicer, list(relays)
        self.swarm_key, self.max_message_bytes = swarm_key, max_message_bytes
        self.identity_path, self.check_every = identity_path, check_every
        self.endpoint: str | None = None
        self.p2p: P2P | None = None
        self._probe: P2P | None = None

    @property
    def peer_id(self) -> str:
        """The libp2p peer id of this peer's data plane (the end of its relayed endpoints)."""
        return self.p2p.peer_id.to_base58()

    async def start(self, timeout: float = 30.0) -> str:
        """Serve, then return the relayed endpoint to announce."""
        deadline = time.monotonic() + timeout
        self.p2p = await self._start_daemon(deadline)
        for method, handle in serve_over_p2p(
            self.servicer, swarm_key=self.swarm_key, max_message_bytes=self.max_message_bytes
        ).items():
            await self.p2p.add_protobuf_handler(method.path, handle, P2PRequest)
        self._probe = await start_p2p()
        while True:
            endpoint = await self._first_reachable()
            if endpoint is not None:
                self.endpoint = endpoint
                return endpoint
            if time.monotonic() >= deadline:
                raise RelayUnavailableError(
                    f"no relay took this peer within {timeout:.0f} s (tried {', '.join(self.relays)}); "
                    "check that they run `dmoe dht` (which relays) and are reachable from here"
                )
            await asyncio.sleep(0.5)

    async def _start_daemon(self, deadline: float, attempts: int = 3) -> P2P:
        """Start the data-plane daemon; p2pd exits when it reaches none of its relays, so try again a few times."""
        attempt = 1
        while True:
            try:
                return await start_p2p(identity_path=self.identity_path, relays=self.relays)
            except P2PDaemonError as exc:
                reason = " ".join(str(exc).split())
                if attempt >= attempts or time.monotonic() + attempt >= deadline:
                    raise RelayUnavailableError(
                        f"could not reach any relay ({', '.join(self.relays)}): {reason}"
                    ) from None
                logger.warning("could not reach a relay (%s); trying again in %d s", reason, attempt)
                await asyncio.sleep(attempt)
                attempt += 1

    async def _first_reachable(self, skip: str | None = None) -> str | None:
        for relay in self.relays:
            endpoint = circuit_endpoint(relay, self.peer_id)
            if endpoint != skip and await self.answers(endpoint):
                return endpoint
        return None

    async def answers(self, endpoint: str, timeout: float = 5.0) -> bool:
        """Whether an Info call through `endpoint` is answered (over a fresh relayed connection)."""
        request = P2PRequest(message=encode_info_request(""), swarm_key=self.swarm_key or "", timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                await connect(self._probe, endpoint)
                answer = await self._probe.call_protobuf_handler(
                    PeerID.from_base58(endpoint_peer_id(endpoint)), Method.INFO.path, request, P2PResponse
                )
            return answer.code == 0
        except Exception as exc:  # a relay without our reservation, a reset circuit, a timeout
            logger.debug("relayed endpoint %s does not answer: %r", endpoint, exc)
            return False
        finally:
            try:
                await disconnect(self._probe, endpoint)
            except Exception:
                pass

    async def watch(self, on_change: Callable[[str], Awaitable[None]]) -> None:
        """Re-check the announced endpoint forever (until cancelled); move to another relay when it fails."""
        while True:
            await asyncio.sleep(self.check_every)
            if await self.answers(self.endpoint):
                continue
            endpoint = await self._first_reachable(skip=self.endpoint)
            if endpoint is None:
                logger.warning("no relay reaches this peer now (%s fails); clients use other replicas", self.endpoint)
                continue
            logger.warning("relayed endpoint %s stopped answering; now reachable at %s", self.endpoint, endpoint)
            self.endpoint = endpoint
            await on_change(endpoint)

    async def shutdown(self) -> None:
        """Stop both daemons."""
        for p2p in (self._probe, self.p2p):
            if p2p is not None:
                await p2p.shutdown()
        self._probe = self.p2p = None
