"""The libp2p transport on loopback: a `--reachability private` peer reached through a real DHT node's relay.

The peer's data-plane daemon listens on no address at all, so every call below crosses the relay (a hivemind
DHT node on 127.0.0.1). Checked: the same answers as over gRPC, relayed connections renewed as the relay's
per-connection byte limit is used up, and security parity (swarm key, per-client limits, message limits).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from hivemind.p2p import P2PContext, PeerID

from dht import DHTNode
from dht.libp2p import check_libp2p_endpoint, is_relayed, transport_of
from dht.records import check_endpoint
from peer import Peer
from peer.p2p_service import P2PCallContext, RelayUnavailableError, serve_over_p2p
from peer.security import ClientLimiter
from proto import Method, decode_info_response, encode_info_request
from proto.dmoe.v1.p2p_pb2 import P2PRequest
from router_client.p2p_channel import RELAYED_MESSAGE_BYTES
from router_client.transport import ExpertCallError, ExpertTransport
from tests.conftest import running_peer

pytestmark = pytest.mark.slow

KEY = "relay-test-key"
HIDDEN = 16


@pytest.fixture(scope="module")
def relay() -> Iterator[DHTNode]:
    node = DHTNode()
    try:
        yield node
    finally:
        node.shutdown()


@pytest.fixture(scope="module")
def relayed_peer(relay: DHTNode) -> Iterator[Peer]:
    with running_peer(
        announce=True,
        initial_peers=relay.visible_maddrs(),
        reachability="private",
        swarm_key=KEY,
        hidden_dim=HIDDEN,
        sync_every=0,
    ) as peer:
        yield peer


def calls(coro_fn, **transport_options):
    """Run ``coro_fn(transport)`` with a fresh `ExpertTransport` on a fresh event loop; always close it."""

    async def main():
        transport = ExpertTransport(**transport_options)
        try:
            return await coro_fn(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


def test_a_private_peer_announces_a_relayed_endpoint(relayed_peer):
    endpoint = relayed_peer.endpoint
    assert is_relayed(endpoint) and transport_of(endpoint) == "relayed"
    assert endpoint.endswith(f"/p2p-circuit/p2p/{relayed_peer.relayed.peer_id}")
    assert check_endpoint(endpoint) is None
    assert relayed_peer.endpoint_info()["transport"] == "relayed"


def test_relayed_calls_answer_as_grpc_does_and_outlive_the_relays_byte_limit(relayed_peer):
    torch.manual_seed(0)
    x = torch.randn(64, HIDDEN)  # 4 KiB a request: 60 of them are more than one relayed connection carries

    async def scenario(transport: ExpertTransport):
        relayed = await transport.call(relayed_peer.endpoint, "ffn.0", [x], backward=False, timeout=10)
        direct = await transport.call(relayed_peer.grpc_endpoint, "ffn.0", [x], backward=False, timeout=10)
        answers = [
            await transport.call(relayed_peer.endpoint, "ffn.1", [x], backward=False, timeout=10) for _ in range(60)
        ]
        before = relayed_peer.backends["ffn.0"].update_count
        grads = await transport.call(
            relayed_peer.endpoint, "ffn.0", [x, torch.ones(64, HIDDEN)], backward=True, timeout=10
        )
        info_call = transport.channel(relayed_peer.endpoint).unary_unary(Method.INFO.path)
        info = decode_info_response(await info_call(encode_info_request(""), timeout=10, metadata=transport.metadata))
        channel = transport.channel(relayed_peer.endpoint)
        return relayed, direct, answers, before, grads, info, channel.connections

    relayed, direct, answers, before, grads, info, connections = calls(scenario, swarm_key=KEY)
    torch.testing.assert_close(relayed[0], direct[0])
    assert all(torch.equal(answer[0], answers[0][0]) for answer in answers)
    assert connections >= 2, "the used-up relayed connection was replaced"
    assert grads[0].shape == x.shape and relayed_peer.backends["ffn.0"].update_count == before + 1
    experts, peer_id = info
    assert sorted(expert.uid for expert in experts) == ["ffn.0", "ffn.1"] and peer_id


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_the_relayed_path_refuses_calls_without_the_swarm_key(relayed_peer, key):
    async def scenario(transport: ExpertTransport):
        await transport.call(relayed_peer.endpoint, "ffn.0", [torch.randn(2, HIDDEN)], backward=False, timeout=10)

    with pytest.raises(ExpertCallError) as failure:
        calls(scenario, swarm_key=key)
    assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED, failure.value


def test_a_request_too_large_for_a_relay_fails_at_once_with_resource_exhausted(relayed_peer):
    tokens = RELAYED_MESSAGE_BYTES // (HIDDEN * 4) + 1

    async def scenario(transport: ExpertTransport):
        started = time.monotonic()
        try:
            await transport.call(
                relayed_peer.endpoint, "ffn.0", [torch.randn(tokens, HIDDEN)], backward=False, timeout=10
            )
        except ExpertCallError as exc:
            return exc, time.monotonic() - started
        raise AssertionError("an oversized request went through")

    error, seconds = calls(scenario, swarm_key=KEY)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "relayed" in error.reason
    assert seconds < 5, "refused before anything was sent"


def test_the_per_client_rate_limit_applies_to_relayed_callers(relay):
    with running_peer(
        announce=True, initial_peers=relay.visible_maddrs(), reachability="private", client_rate_limit=1.0
    ) as peer:

        async def scenario(transport: ExpertTransport):
            outcomes = []
            for _ in range(6):  # a burst of 2 is allowed, then one call a second
                try:
                    await transport.call(peer.endpoint, "ffn.0", [torch.randn(2, HIDDEN)], backward=False, timeout=10)
                    outcomes.append("ok")
                except ExpertCallError as exc:
                    outcomes.append(exc.code)
            return outcomes

        outcomes = calls(scenario)
    assert outcomes[:2] == ["ok", "ok"], outcomes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes[2:], outcomes


def test_a_private_peer_whose_relays_do_not_answer_fails_with_one_line(relay):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    dead_relay = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/{relay.peer_id}"
    started = time.monotonic()
    with pytest.raises(RelayUnavailableError, match="could not reach any relay") as failure:
        with running_peer(
            announce=True, initial_peers=relay.visible_maddrs(), relays=[dead_relay], reachability="private"
        ):
            pass
    assert "\n" not in str(failure.value) and dead_relay in str(failure.value)
    assert time.monotonic() - started < 45, "it gave up within the start timeout"


def test_relayed_callers_are_told_apart_by_their_authenticated_peer_id():
    first = ClientLimiter.client_of(P2PCallContext("QmCaller", "abc", timeout=5))
    assert first == ("p2p:QmCaller", "p2p:QmCaller/abc")
    assert ClientLimiter.client_of(P2PCallContext("QmOther", "abc", timeout=5))[0] != first[0]


def test_the_peer_refuses_a_relayed_message_over_its_limit(relayed_peer):
    handlers = serve_over_p2p(relayed_peer.servicer, swarm_key=None, max_message_bytes=1000)
    caller = PeerID.from_base58("QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC")
    context = P2PContext(handle_name=Method.FORWARD.path, local_id=caller, remote_id=caller)
    answer = asyncio.run(handlers[Method.FORWARD](P2PRequest(message=b"\0" * 2000), context))
    assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "1000" in answer.details


def test_records_accept_libp2p_endpoints_and_refuse_malformed_ones():
    relay = "/ip4/203.0.113.7/tcp/31337/p2p/QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"
    relayed = f"{relay}/p2p-circuit/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    assert check_endpoint(relayed) is None and transport_of(relayed) == "relayed"
    assert transport_of("10.0.0.5:31337") == "direct"
    assert check_libp2p_endpoint("/ip4/203.0.113.7/tcp/31337") is not None  # no peer id
    assert check_endpoint(f"{relayed}/p2p-circuit/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N") is not None
    assert check_endpoint("/ipx/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N") is not None


def test_the_monitor_asks_a_relayed_peer_for_its_info_over_libp2p(relay, relayed_peer):
    from dht import ExpertDirectory
    from dmoe_cli.monitor.poller import SwarmPoller

    async def poll():
        poller = SwarmPoller(ExpertDirectory(relay), "ffn", swarm_key=KEY, info_timeout=10.0)
        try:
            return await poller.poll()
        finally:
            await poller.close()

    result = asyncio.run(poll())
    assert not result.failures, result.failures
    assert sorted(status.uid for status in result.answers[relayed_peer.endpoint]) == ["ffn.0", "ffn.1"]
