"""ForwardMany/BackwardMany: a router's small requests to one peer travel in one call, each part on its own.

Also the transport's other forms against a real peer: chunked streams for large requests, and the limits that
client and peer share through `proto.contract`.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from dht import ExpertReplica
from peer.experts import get_expert_class
from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    MAX_BATCH_PARTS,
    SERVICE_NAME,
    Method,
    PartFailure,
    decode_info_response,
    deserialize_tensor,
    encode_batch_request,
    encode_batch_response,
    encode_info_request,
    expert_pb2,
    expert_pb2_grpc,
    serialize_tensor,
)
from router_client.dispatch import Dispatcher, ExpertJob
from router_client.replicas import PeerScores
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
    # the answer of a call of its own, up to rounding: the experts of a batch are computed together (joint_forward)
    torch.testing.assert_close(
        deserialize_tensor(results[2].response.tensors[0]), deserialize_tensor(single.tensors[0])
    )
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


# ------------------------------------------------------------------- one pass per batch, and the client's side of it


def test_the_experts_of_one_forward_many_are_computed_in_one_pass():
    with running_peer(experts="ffn.[0:6]") as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            xs = [torch.randn(i + 1, 16) for i in range(6)]
            parts = [request(f"ffn.{i}", x) for i, x in enumerate(xs)]
            stub.ForwardMany(expert_pb2.ExpertRequestBatch(requests=parts), timeout=10)  # warm: durations known
            passes = peer._compute.passes
            results = stub.ForwardMany(expert_pb2.ExpertRequestBatch(requests=parts), timeout=10).results
            assert peer._compute.passes == passes + 1, "six experts, one pass"
            for i, (x, result) in enumerate(zip(xs, results, strict=True)):
                expected = peer.backends[f"ffn.{i}"].forward([x])[0]
                torch.testing.assert_close(deserialize_tensor(result.response.tensors[0]), expected)


def test_a_failing_expert_fails_only_its_own_part_of_the_pass(tmp_path):
    module = tmp_path / "picky.py"
    module.write_text(
        "import torch\n"
        "from peer import register_expert_class\n\n"
        "@register_expert_class('picky')\n"
        "class Picky(torch.nn.Module):\n"
        "    def __init__(self, hidden_dim):\n"
        "        super().__init__()\n"
        "        self.scale = torch.nn.Parameter(torch.ones(hidden_dim))\n\n"
        "    def forward(self, x):\n"
        "        if bool((x < -100).any()):\n"
        "            raise ValueError('refuses very negative inputs')\n"
        "        return x * self.scale\n"
    )
    with running_peer(experts="p.[0:3]", expert_cls="picky", custom_module=str(module)) as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            good, bad = torch.randn(2, 16), torch.full((2, 16), -1000.0)
            parts = [request("p.0", good), request("p.1", bad), request("p.2", good)]
            results = stub.ForwardMany(expert_pb2.ExpertRequestBatch(requests=parts), timeout=10).results
            assert [r.code for r in results] == [0, grpc.StatusCode.INTERNAL.value[0], 0]
            assert "refuses very negative inputs" in results[1].message
            torch.testing.assert_close(deserialize_tensor(results[2].response.tensors[0]), good)


def test_the_backwards_of_one_backward_many_run_in_one_autograd_pass_with_the_results_of_separate_ones():
    from peer.backend import ExpertBackend

    xs, grads = [torch.randn(i + 2, 16) for i in range(4)], [torch.randn(i + 2, 16) for i in range(4)]
    make = dict(clip_grad_norm=1.0)  # as the peer clips (PeerConfig)
    alone = [ExpertBackend(f"ffn.{i}", get_expert_class("ffn"), 16, seed=i, **make) for i in range(4)]
    expected = [backend.backward([x], [g]) for backend, x, g in zip(alone, xs, grads, strict=True)]
    with running_peer(experts="ffn.[0:4]", hidden_dim=16, seed=None) as peer:
        for i in range(4):  # the same starting weights as the experts computed alone
            peer.backends[f"ffn.{i}"].module.load_state_dict(
                ExpertBackend(f"ffn.{i}", get_expert_class("ffn"), 16, seed=i).module.state_dict()
            )
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            bad = request("ffn.3", torch.randn(2, 16), torch.full((2, 16), float("nan")))
            parts = [request(f"ffn.{i}", x, g) for i, (x, g) in enumerate(zip(xs, grads, strict=True))]
            passes = peer._compute.passes
            results = stub.BackwardMany(expert_pb2.ExpertRequestBatch(requests=[*parts[:3], bad]), timeout=10).results
            assert peer._compute.passes == passes + 1, "three backwards, one pass"
            assert results[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], "the poisoned part fails alone"
            for i in range(3):
                torch.testing.assert_close(deserialize_tensor(results[i].response.tensors[0]), expected[i][0])
                for mine, theirs in zip(
                    peer.backends[f"ffn.{i}"].module.parameters(), alone[i].module.parameters(), strict=True
                ):
                    torch.testing.assert_close(mine, theirs)  # the same optimizer step


def test_a_backward_that_fails_inside_the_joint_pass_fails_alone(tmp_path, caplog):
    module = tmp_path / "fragile.py"
    module.write_text(
        "import torch\n"
        "from peer import register_expert_class\n\n"
        "class Check(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x.clone()\n\n"
        "    @staticmethod\n"
        "    def backward(ctx, grad):\n"
        "        if bool((grad > 1000).any()):\n"
        "            raise ValueError('gradient too large for this expert')\n"
        "        return grad\n\n"
        "@register_expert_class('fragile')\n"
        "class Fragile(torch.nn.Module):\n"
        "    def __init__(self, hidden_dim):\n"
        "        super().__init__()\n"
        "        self.scale = torch.nn.Parameter(torch.ones(hidden_dim))\n\n"
        "    def forward(self, x):\n"
        "        return Check.apply(x * self.scale)\n"
    )
    with running_peer(experts="f.[0:3]", expert_cls="fragile", custom_module=str(module), optimizer="sgd") as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            x, good, bad = torch.randn(2, 16), torch.ones(2, 16), torch.full((2, 16), 5000.0)
            parts = [request("f.0", x, good), request("f.1", x, bad), request("f.2", x, good)]
            results = stub.BackwardMany(expert_pb2.ExpertRequestBatch(requests=parts), timeout=10).results
            assert [r.code for r in results] == [0, grpc.StatusCode.INTERNAL.value[0], 0]
            assert "gradient too large" in results[1].message
            assert "computing its 3 pieces one by one" in caplog.text, "the joint pass ran, failed, and was redone"
            for i in (0, 2):
                torch.testing.assert_close(deserialize_tensor(results[i].response.tensors[0]), good)
            assert [peer.backends[f"f.{i}"].update_count for i in range(3)] == [1, 0, 1]
            assert all(p.grad is None for p in peer.backends["f.1"].module.parameters()), "no gradient left behind"


@pytest.mark.parametrize("compression", [0, COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT])
def test_batch_messages_are_the_bytes_protobuf_writes(compression):
    tensors = [
        torch.randn(2, 64),
        torch.randn(3, 5).t(),  # not contiguous
        -torch.randn(3),  # a negative view
        torch.tensor(3.0),  # 0-d
        torch.zeros(0, 4),  # no elements
        torch.randint(0, 9, (3,)),
        torch.rand(4) > 0.5,
        torch.randn(3, 4).bfloat16(),
        torch.randn(2, 2).half(),
    ]
    requests = [("ffn.0", [t], 0) for t in tensors] + [("", [], 2**64 - 1), ("ünï.1", tensors[:3], 12345)]
    for response_compression in (0, COMPRESSION_FLOAT16):
        expected = expert_pb2.ExpertRequestBatch(
            requests=[
                expert_pb2.ExpertRequest(
                    uid=uid,
                    tensors=[serialize_tensor(t, compression) for t in ts],
                    response_compression=response_compression,
                    forward_id=forward_id,
                )
                for uid, ts, forward_id in requests
            ]
        ).SerializeToString()
        raw = encode_batch_request(requests, compression=compression, response_compression=response_compression)
        assert raw == expected
    failures = [PartFailure(grpc.StatusCode.NOT_FOUND, "no such expert ü"), PartFailure(grpc.StatusCode.INTERNAL, "")]
    results = [[t] for t in tensors] + [[], *failures, tensors[:4]]
    expected = expert_pb2.ExpertResponseBatch(
        results=[
            expert_pb2.ExpertResult(code=r.code.value[0], message=r.message)
            if isinstance(r, PartFailure)
            else expert_pb2.ExpertResult(
                response=expert_pb2.ExpertResponse(tensors=[serialize_tensor(t, compression) for t in r])
            )
            for r in results
        ]
    ).SerializeToString()
    assert encode_batch_response(results, compressions=[compression] * len(results)) == expected


def test_call_many_sends_small_requests_together_and_large_ones_alone_in_order():
    loop = LoopThread()
    try:
        with running_peer(experts="ffn.[0:3]", hidden_dim=64, max_batch_size=100_000) as peer:
            transport = ExpertTransport(coalesce_bytes=4096)
            small, large = torch.randn(2, 64), torch.randn(64, 64)  # 512 bytes and 16 KiB
            requests = [("ffn.0", [small], 0), ("ffn.1", [large], 0), ("ffn.9", [small], 0), ("ffn.2", [small], 0)]
            try:
                outcomes = loop.run(transport.call_many(peer.endpoint, requests, backward=False, timeout=10))
            finally:
                loop.run(transport.close())
            assert (peer.servicer.calls["ForwardMany"], peer.servicer.calls["Forward"]) == (1, 1)
            assert isinstance(outcomes[2], ExpertCallError) and outcomes[2].code == grpc.StatusCode.NOT_FOUND
            for (uid, (x,), _), outcome in zip(requests, outcomes, strict=True):
                if uid != "ffn.9":
                    torch.testing.assert_close(outcome[0], peer.backends[uid].forward([x])[0])
    finally:
        loop.close()


def test_dispatcher_sends_one_call_per_peer_and_fails_a_refused_part_over_to_another_replica():
    """Both jobs' best replica is peer A, which does not host ffn.3: ffn.2 is served there in the same
    ForwardMany, ffn.3 moves on to peer B."""
    loop = LoopThread()
    try:
        with running_peer(experts="ffn.[0:3]") as a, running_peer(experts="ffn.[2:4]") as b:
            scores = PeerScores()
            scores.record_success(a.endpoint, 0.001)  # fast: first in line
            scores.record_success(b.endpoint, 1.0)
            dispatcher = Dispatcher(ExpertTransport(), scores)
            replicas = {
                uid: [ExpertReplica(uid, a.endpoint, "a", float("inf")), ExpertReplica(uid, b.endpoint, "b", 1e18)]
                for uid in ("ffn.2", "ffn.3")
            }
            x = torch.randn(4, 16)
            jobs = [ExpertJob(uid, torch.arange(4), torch.zeros(4, dtype=torch.int64)) for uid in ("ffn.2", "ffn.3")]
            try:
                served, moved = loop.run(
                    dispatcher.run(
                        jobs,
                        lambda job: [x],
                        replicas,
                        backward=False,
                        deadline=time.monotonic() + 10,
                        required=torch.full((4,), 2),
                        grace=0.0,
                        expected_shapes=lambda job: [(4, 16)],
                    )
                )
            finally:
                loop.run(dispatcher.transport.close())
            assert served.ok and served.replica.endpoint == a.endpoint
            assert moved.ok and moved.replica.endpoint == b.endpoint
            torch.testing.assert_close(moved.outputs[0], b.backends["ffn.3"].forward([x])[0])
            assert (a.servicer.calls["ForwardMany"], a.servicer.calls["Forward"]) == (1, 0)
            assert a.endpoint in scores.banned(), "the refusal is recorded"
    finally:
        loop.close()


def test_answers_checked_together_flag_only_the_anomalous_one():
    dispatcher = Dispatcher(ExpertTransport(), PeerScores())
    answers = [[torch.randn(3, 8)] for _ in range(5)]
    answers[2][0][1, 4] = float("nan")
    uids = [f"ffn.{i}" for i in range(5)]
    problems = dispatcher._check_many(answers, [[(3, 8)]] * 5, uids, backward=False)
    assert [p is None for p in problems] == [True, True, False, True, True]
    assert "NaN" in str(problems[2])
    wrong_shape = dispatcher._check_many([[torch.randn(2, 8)]], [[(3, 8)]], ["ffn.0"], backward=False)
    assert "shapes" in str(wrong_shape[0])
    for _ in range(10):  # the running mean of ffn.0's norms, from answers checked together with others
        dispatcher._check_many([[torch.randn(3, 8)], [torch.randn(1, 8)]], [[], []], uids[:2], backward=False)
    huge = dispatcher._check_many([[torch.randn(3, 8) * 1e4], [torch.randn(1, 8)]], [[], []], uids[:2], backward=False)
    assert "norm" in str(huge[0]) and huge[1] is None
