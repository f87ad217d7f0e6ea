"""The peer's gRPC service: results equal local compute, batching, every bad input gets its status code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import textwrap
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import COMPRESSION_NONE, deserialize_tensor, expert_pb2, expert_pb2_grpc, serialize_tensor, split_tensor
from proto.dmoe.v1 import tensor_pb2
from tests.conftest import running_peer


def forward(stub, uid, *tensors, timeout=10.0, method="Forward"):
    request = expert_pb2.ExpertRequest(uid=uid, tensors=[serialize_tensor(t) for t in tensors])
    response = getattr(stub, method)(request, timeout=timeout)
    return [deserialize_tensor(t) for t in response.tensors]


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_remote_forward_and_backward_equal_the_local_module(peer, stub):
    backend = peer.backends["ffn.0"]
    local = torch.nn.Module()
    local.module = type(backend.module)(16)
    local.module.load_state_dict(backend.module.state_dict())
    x = torch.randn(5, 16)
    grad = torch.randn(5, 16)

    (remote_out,) = forward(stub, "ffn.0", x)
    x_local = x.clone().requires_grad_()
    local_out = local.module(x_local)
    torch.testing.assert_close(remote_out, local_out.detach(), atol=1e-5, rtol=1e-5)

    local_out.backward(grad)
    (remote_grad,) = forward(stub, "ffn.0", x, grad, method="Backward")
    torch.testing.assert_close(remote_grad, x_local.grad, atol=1e-5, rtol=1e-5)
    assert backend.update_count == 1
    (after_step,) = forward(stub, "ffn.0", x)
    assert not torch.allclose(after_step, remote_out), "the optimizer step should change the expert"


def test_info_reports_schema_size_and_updates(peer, stub):
    info = stub.Info(expert_pb2.InfoRequest(uid="ffn.1"), timeout=5).experts[0]
    assert info.uid == "ffn.1" and info.expert_cls == "ffn"
    assert list(info.inputs[0].shape) == [-1, 16] and list(info.outputs[0].shape) == [-1, 16]
    assert info.num_parameters == sum(p.numel() for p in peer.backends["ffn.1"].module.parameters())
    assert info.update_count == 0
    everything = stub.Info(expert_pb2.InfoRequest(), timeout=5)
    assert [e.uid for e in everything.experts] == ["ffn.0", "ffn.1"]


def test_health_is_serving_and_reflection_lists_the_service(peer):
    with grpc.insecure_channel(peer.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="dmoe.v1.ExpertService"), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "dmoe.v1.ExpertService" in names


def test_concurrent_requests_are_merged_into_fewer_batches(peer, stub):
    stats = peer.servicer.experts["ffn.0"].forward_queue.stats
    before = stats.batches_processed
    inputs = [torch.randn(3, 16) for _ in range(32)]
    request = [expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x)]) for x in inputs]
    futures = [stub.Forward.future(r, timeout=20) for r in request]
    outputs = [deserialize_tensor(f.result().tensors[0]) for f in futures]
    batches = stats.batches_processed - before
    assert batches < len(inputs), f"{len(inputs)} requests ran as {batches} batches"
    expected = peer.backends["ffn.0"].forward([torch.cat(inputs)])[0]
    torch.testing.assert_close(torch.cat(outputs), expected, atol=1e-5, rtol=1e-5)


def test_every_bad_request_gets_its_status_code_and_the_next_good_one_succeeds(peer, stub):
    good = torch.randn(4, 16)
    (reference,) = forward(stub, "ffn.0", good)
    weights = {k: v.clone() for k, v in peer.backends["ffn.0"].module.state_dict().items()}

    wrong_shape = lambda: forward(stub, "ffn.0", torch.randn(4, 15))  # noqa: E731
    wrong_dtype = lambda: forward(stub, "ffn.0", torch.randn(4, 16, dtype=torch.float64).half())  # noqa: E731
    unknown_uid = lambda: forward(stub, "ffn.99", good)  # noqa: E731
    too_many_tensors = lambda: forward(stub, "ffn.0", good, good)  # noqa: E731
    too_many_tokens = lambda: forward(stub, "ffn.0", torch.randn(9000, 16))  # noqa: E731

    def size_mismatch():
        message = serialize_tensor(good)
        message.shape[0] = 400
        stub.Forward(expert_pb2.ExpertRequest(uid="ffn.0", tensors=[message]), timeout=5)

    def huge_declared_shape():
        message = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[50_000_000, 16], buffer=b"\0" * 64)
        stub.Forward(expert_pb2.ExpertRequest(uid="ffn.0", tensors=[message]), timeout=5)

    def garbage_bytes():
        from proto import Method

        with grpc.insecure_channel(peer.endpoint) as channel:
            raw = channel.unary_unary(Method.FORWARD.path)
            raw(b"\xff\xff\xff\xff garbage \x00\x01", timeout=5)

    def nan_gradient():
        forward(stub, "ffn.0", good, torch.full((4, 16), float("nan")), method="Backward")

    expected = {
        wrong_shape: grpc.StatusCode.INVALID_ARGUMENT,
        wrong_dtype: grpc.StatusCode.INVALID_ARGUMENT,
        unknown_uid: grpc.StatusCode.NOT_FOUND,
        too_many_tensors: grpc.StatusCode.INVALID_ARGUMENT,
        too_many_tokens: grpc.StatusCode.RESOURCE_EXHAUSTED,
        size_mismatch: grpc.StatusCode.INVALID_ARGUMENT,
        huge_declared_shape: grpc.StatusCode.RESOURCE_EXHAUSTED,
        garbage_bytes: grpc.StatusCode.INVALID_ARGUMENT,
    }
    for call, code in expected.items():
        got, details = status_of(call)
        assert got == code, f"{call.__name__}: {got} {details}"
        assert details, "every refusal carries a human-readable message"
        (again,) = forward(stub, "ffn.0", good)
        torch.testing.assert_close(again, reference)

    code, details = status_of(nan_gradient)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
    backend = peer.backends["ffn.0"]
    assert backend.updates_skipped == 1 and backend.update_count == 0
    for name, value in backend.module.state_dict().items():
        torch.testing.assert_close(value, weights[name])
    (again,) = forward(stub, "ffn.0", good)
    torch.testing.assert_close(again, reference)


def test_large_requests_travel_in_chunks_over_the_stream():
    with running_peer(hidden_dim=64, max_message_mb=1, max_batch_size=100_000) as peer:
        options = [("grpc.max_receive_message_length", 1 << 20), ("grpc.max_send_message_length", 1 << 20)]
        with grpc.insecure_channel(peer.endpoint, options=options) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            x = torch.randn(20_000, 64)  # 5 MiB
            parts = list(split_tensor(serialize_tensor(x, COMPRESSION_NONE), 512 * 1024))
            assert len(parts) > 1
            requests = [expert_pb2.ExpertRequest(uid="ffn.0", tensors=[parts[0]])]
            requests += [expert_pb2.ExpertRequest(tensors=[p]) for p in parts[1:]]
            from proto import iter_tensors_from_chunks

            chunks = [t for r in stub.ForwardStream(iter(requests), timeout=30) for t in r.tensors]
            (output,) = [deserialize_tensor(t) for t in iter_tensors_from_chunks(chunks)]
            torch.testing.assert_close(output, peer.backends["ffn.0"].forward([x])[0])
            big = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x)])
            code, _ = status_of(lambda: stub.Forward(big, timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_work_whose_deadline_passed_is_dropped_before_compute(tmp_path):
    module = tmp_path / "slow.py"
    module.write_text(
        textwrap.dedent("""
        import time
        import torch
        from peer import register_expert_class

        @register_expert_class("slow_identity")
        class SlowIdentity(torch.nn.Module):
            def __init__(self, hidden_dim):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

            def forward(self, x):
                if x.shape[0] > 2:
                    time.sleep(0.5)
                return x * self.scale
    """)
    )
    with running_peer(experts="slow.0", expert_cls="slow_identity", custom_module=str(module)) as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            slow = stub.Forward.future(
                expert_pb2.ExpertRequest(uid="slow.0", tensors=[serialize_tensor(torch.ones(3, 16))]), timeout=10
            )
            time.sleep(0.15)  # the slow batch is computing now; the next request waits behind it
            code, _ = status_of(lambda: forward(stub, "slow.0", torch.ones(1, 16), timeout=0.2))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            slow.result()
            stats = peer.servicer.experts["slow.0"].forward_queue.stats
            assert stats.batches_processed == 1, "the expired request must not be computed"


def test_shutting_down_peer_answers_unavailable(peer, stub):
    peer.servicer.closing = True
    try:
        code, details = status_of(lambda: forward(stub, "ffn.0", torch.randn(2, 16)))
    finally:
        peer.servicer.closing = False
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


def test_full_queue_answers_resource_exhausted():
    with running_peer(max_queue_size=1) as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            request = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(torch.randn(2000, 16))])
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(stub.Forward, request, timeout=20) for _ in range(16)]
                codes = set()
                for future in futures:
                    try:
                        future.result()
                        codes.add(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.add(exc.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
            forward(stub, "ffn.0", torch.randn(2, 16))


def test_swiglu_and_bfloat16_inputs_are_refused_cleanly():
    with running_peer(experts="sw.0", expert_cls="swiglu") as peer:
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            (out,) = forward(stub, "sw.0", torch.randn(3, 16))
            assert out.shape == (3, 16)
            code, details = status_of(lambda: forward(stub, "sw.0", torch.randn(3, 16).bfloat16()))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "dtype" in details


def test_graceful_stop_finishes_in_flight_work_and_refuses_new_work(tmp_path):
    module = tmp_path / "slow.py"
    module.write_text(
        textwrap.dedent("""
        import time
        import torch
        from peer import register_expert_class

        @register_expert_class("half_second")
        class HalfSecond(torch.nn.Module):
            def __init__(self, hidden_dim):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

            def forward(self, x):
                time.sleep(0.5)
                return x * self.scale
    """)
    )
    from peer import Peer, PeerConfig
    from tests.conftest import LoopThread

    loop = LoopThread()
    peer = Peer(
        PeerConfig(experts="h.0", expert_cls="half_second", custom_module=str(module), hidden_dim=16), announce=False
    )
    try:
        loop.run(peer.start())
        with grpc.insecure_channel(peer.endpoint) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            request = expert_pb2.ExpertRequest(uid="h.0", tensors=[serialize_tensor(torch.ones(2, 16))])
            in_flight = stub.Forward.future(request, timeout=10)
            time.sleep(0.2)
            stopping = asyncio.run_coroutine_threadsafe(peer.stop(), loop.loop)
            time.sleep(0.05)
            code, _ = status_of(lambda: stub.Forward(request, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert deserialize_tensor(in_flight.result().tensors[0]).shape == (2, 16)
            stopping.result(15)
    finally:
        try:
            loop.run(peer.stop(), timeout=30)  # stop is idempotent: this waits for a stop already under way
        finally:
            loop.close()
