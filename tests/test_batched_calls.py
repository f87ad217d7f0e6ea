"""ForwardMany/BackwardMany: a router's small requests to one peer travel in one call, each part on its own.

Also the transport's other forms against a real peer: chunked streams for large requests, and the limits that
client and peer share through `proto.contract`.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from proto import (
    MAX_BATCH_PARTS,
    SERVICE_NAME,
    Method,
    decode_info_response,
    deserialize_tensor,
    encode_info_request,
    expert_pb2,
    serialize_tensor,
)
from router_client.transport import ExpertCallError, ExpertTransport
from tests.conftest import LoopThread, running_peer


def request(uid: str, *tensors: torch.Tensor, forward_id: int = 0) -> expert_pb2.ExpertRequest:
    return expert_pb2.ExpertRequest(uid=uid, tensors=[serialize_tensor(t) for t in tensors], forward_id=forward_id)


def test_each_part_of_a_batch_gets_its_own_answer_or_status(peer, stub):
    x0, x1 = torch.randn(3, 16), torch.randn(5, 16)
    batch = expert_pb2.ExpertRequestBatch(
        requests=[request("ffn.0", x0), request("ffn.9", x0), request("ffn.1", x1), request("ffn.1", torch.randn(2, 8))]
    )
    results = stub.ForwardMany(batch, timeout=10).results
    assert [r.code for r in results] == [
        0,
        grpc.StatusCode.NOT_FOUND.value[0],
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert "ffn.9" in results[1].message and "shape" in results[3].message
    single = stub.Forward(request("ffn.1", x1), timeout=10)
    assert results[2].response == single  # the same bytes as a call of its own
    assert peer.servicer.calls["ForwardMany"] == 1 and peer.servicer.requests["forward"] == 5

    with pytest.raises(grpc.RpcError) as info:
        stub.BackwardMany(expert_pb2.ExpertRequestBatch(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_backward_many_steps_every_expert_and_reuses_kept_graphs(peer, stub):
    x, grad = torch.randn(4, 16), torch.randn(4, 16)
    stub.ForwardMany(
        expert_pb2.ExpertRequestBatch(requests=[request(u, x, forward_id=5) for u in ("ffn.0", "ffn.1")]), timeout=10
    )
    results = stub.BackwardMany(
        expert_pb2.ExpertRequestBatch(requests=[request(u, x, grad, forward_id=5) for u in ("ffn.0", "ffn.1")]),
        timeout=10,
    ).results
    assert all(r.code == 0 and deserialize_tensor(r.response.tensors[0]).shape == (4, 16) for r in results)
    assert [peer.backends[u].update_count for u in ("ffn.0", "ffn.1")] == [1, 1]
    assert peer.graphs.hits == 2


def test_transport_sends_concurrent_small_calls_as_one_and_keeps_failures_apart():
    loop = LoopThread()
    try:
        with running_peer() as peer:
            transport = ExpertTransport()

            async def calls():
                x = torch.randn(2, 16)
                coros = [
                    transport.call(peer.endpoint, uid, [x], backward=False, timeout=10)
                    for uid in ("ffn.0", "ffn.1", "ffn.7")
                ]
                return await asyncio.gather(*coros, return_exceptions=True)

            out0, out1, missing = loop.run(calls())
            assert out0[0].shape == out1[0].shape == (2, 16)
            assert isinstance(missing, ExpertCallError) and missing.code == grpc.StatusCode.NOT_FOUND
            assert peer.servicer.calls["ForwardMany"] == 1 and peer.servicer.calls["Forward"] == 0

            (alone,) = loop.run(
                transport.call(peer.endpoint, "ffn.0", [torch.randn(2, 16)], backward=False, timeout=10)
            )
            assert peer.servicer.calls["Forward"] == 1, "a request with no company goes as a plain Forward"
            loop.run(transport.close())
    finally:
        loop.close()


def test_a_peer_without_batches_gets_one_call_per_request():
    """A peer from before ForwardMany answers UNIMPLEMENTED; the transport remembers and sends singles."""
    loop = LoopThread()
    try:
        with running_peer() as peer:

            async def start_old_server():  # serves Forward only, by relaying it to the real peer
                channel = grpc.aio.insecure_channel(peer.endpoint)
                relay = channel.unary_unary(Method.FORWARD.path)

                async def forward(request: bytes, context) -> bytes:
                    return await relay(request, timeout=10)

                server = grpc.aio.server()
                handler = grpc.method_handlers_generic_handler(
                    SERVICE_NAME, {Method.FORWARD.value: grpc.unary_unary_rpc_method_handler(forward)}
                )
                server.add_generic_rpc_handlers((handler,))
                port = server.add_insecure_port("127.0.0.1:0")
                await server.start()
                return server, port

            server, port = loop.run(start_old_server())
            try:
                transport = ExpertTransport()
                endpoint = f"127.0.0.1:{port}"

                async def calls():
                    x = torch.randn(3, 16)
                    return await asyncio.gather(
                        *(transport.call(endpoint, u, [x], backward=False, timeout=10) for u in ("ffn.0", "ffn.1"))
                    )

                first = loop.run(calls())
                second = loop.run(calls())
                assert [t[0].shape for t in first + second] == [(3, 16)] * 4
                assert endpoint in transport._no_batches and peer.servicer.calls["Forward"] == 4
                loop.run(transport.close())
            finally:
                loop.run(server.stop(0))
    finally:
        loop.close()


def test_one_more_small_call_than_a_batch_holds_goes_as_a_full_batch_the_peer_accepts_and_a_single():
    loop = LoopThread()
    try:
        with running_peer() as peer:
            transport = ExpertTransport()
            calls = MAX_BATCH_PARTS + 1
            x = torch.randn(2, 16)
            reference = peer.backends["ffn.0"].forward([x])[0]

            async def send():
                coros = [transport.call(peer.endpoint, "ffn.0", [x], backward=False, timeout=30) for _ in range(calls)]
                return await asyncio.gather(*coros)

            try:
                outputs = loop.run(send())
            finally:
                loop.run(transport.close())
            for (out,) in outputs:
                torch.testing.assert_close(out, reference)
            # one full batch of MAX_BATCH_PARTS (the peer's limit too, or it would refuse it), then the one left over
            assert (peer.servicer.calls["ForwardMany"], peer.servicer.calls["Forward"]) == (1, 1)
            assert peer.servicer.requests["forward"] == calls
    finally:
        loop.close()


@pytest.mark.parametrize("backward", [False, True])
def test_requests_over_the_message_limit_travel_as_chunked_streams(backward):
    loop = LoopThread()
    try:
        with running_peer(hidden_dim=64, max_message_mb=1, max_batch_size=100_000) as peer:
            transport = ExpertTransport(max_message_bytes=1 << 20)
            x, grad = torch.randn(8192, 64), torch.randn(8192, 64)  # 2 MiB each
            tensors = [x, grad] if backward else [x]
            try:
                (out,) = loop.run(
                    transport.call(peer.endpoint, "ffn.1", tensors, backward=backward, timeout=60, forward_id=3)
                )
            finally:
                loop.run(transport.close())
            name = Method.stream(backward).value
            assert peer.servicer.calls[name] == 1 and peer.servicer.calls[Method.unary(backward).value] == 0
            assert out.shape == x.shape
            if backward:
                assert peer.backends["ffn.1"].update_count == 1 and bool(torch.isfinite(out).all())
            else:
                torch.testing.assert_close(out, peer.backends["ffn.1"].forward([x])[0])
    finally:
        loop.close()


def test_info_answers_in_typed_records(peer):
    with grpc.insecure_channel(peer.endpoint) as channel:
        info = channel.unary_unary(Method.INFO.path)
        experts, _ = decode_info_response(info(encode_info_request("ffn.1"), timeout=10))
        everything, _ = decode_info_response(info(encode_info_request(), timeout=10))
    (status,) = experts
    assert (status.uid, status.expert_cls, status.update_count) == ("ffn.1", "ffn", 0)
    assert [spec.shape for spec in status.inputs] == [(-1, 16)] and status.inputs[0].dtype == torch.float32
    assert [e.uid for e in everything] == ["ffn.0", "ffn.1"]
