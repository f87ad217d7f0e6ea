"""Kept forward graphs: a training Backward reuses its Forward's graph, with the same gradients as recomputing."""

from __future__ import annotations

import torch

from peer.backend import ExpertBackend
from peer.experts import get_expert_class
from peer.graphs import ForwardGraphStore, KeptForward
from proto import expert_pb2, serialize_tensor
from tests.conftest import running_peer
from tests.test_peer import forward


def make_backend(graphs: ForwardGraphStore | None, *, optimizer: str = "sgd") -> ExpertBackend:
    return ExpertBackend("ffn.0", get_expert_class("ffn"), 16, optimizer=optimizer, lr=0.1, seed=1, graphs=graphs)


def test_backward_through_the_kept_graph_equals_recomputing():
    kept, recomputed = make_backend(ForwardGraphStore(1 << 20)), make_backend(None)
    x, grad = torch.randn(6, 16), torch.randn(6, 16)
    (out_kept,) = kept.forward([x], forward_id=7)
    (out_plain,) = recomputed.forward([x], forward_id=7)
    torch.testing.assert_close(out_kept, out_plain)
    assert len(kept.graphs) == 1 and kept.graphs.nbytes > 6 * 16 * 4 * 3

    (grad_kept,) = kept.backward([x], [grad], forward_id=7)
    (grad_plain,) = recomputed.backward([x], [grad], forward_id=7)
    torch.testing.assert_close(grad_kept, grad_plain)
    assert (kept.graphs.hits, kept.graphs.misses, len(kept.graphs), kept.graphs.nbytes) == (1, 0, 0, 0)
    for a, b in zip(kept.module.parameters(), recomputed.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same optimizer step on both
    assert kept.update_count == recomputed.update_count == 1


def test_a_graph_is_not_reused_for_other_inputs_or_after_the_expert_changed():
    backend, reference = make_backend(ForwardGraphStore(1 << 20)), make_backend(None)
    x, other, grad = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)

    backend.forward([x], forward_id=1)
    (g,) = backend.backward([other], [grad], forward_id=1)  # same id, different inputs: recompute
    (g_ref,) = reference.backward([other], [grad])
    torch.testing.assert_close(g, g_ref)
    assert (backend.graphs.hits, backend.graphs.misses) == (0, 1)

    backend.forward([x], forward_id=2)
    backend.backward([x], [grad], forward_id=3)  # another Backward steps the expert in between
    reference.backward([x], [grad])
    (g,) = backend.backward([x], [grad], forward_id=2)  # its graph used the old weights: recompute
    (g_ref,) = reference.backward([x], [grad])
    torch.testing.assert_close(g, g_ref)
    assert (backend.graphs.hits, backend.graphs.misses) == (0, 3)


def test_inference_forwards_keep_nothing():
    backend = make_backend(ForwardGraphStore(1 << 20))
    backend.forward([torch.randn(3, 16)])
    assert len(backend.graphs) == 0


def test_the_store_is_bounded_in_bytes_and_age():
    store = ForwardGraphStore(max_bytes=1000, max_age=10.0)
    entry = lambda nbytes, created=0.0: KeptForward([], (), (), nbytes, created)  # noqa: E731
    assert store.put("a", 1, entry(400)) and store.put("a", 2, entry(400))
    assert store.put("a", 3, entry(400))  # evicts the oldest
    assert store.pop("a", 1) is None and store.nbytes == 800 and store.evicted == 1
    assert not store.put("a", 4, entry(1001))  # larger than the whole store: not kept
    assert store.put("b", 1, entry(10, created=100.0))  # the others are older than max_age
    assert len(store) == 1 and store.nbytes == 10 and store.evicted == 3


def test_peer_reuses_the_graph_when_the_backward_repeats_the_forward_id():
    with running_peer(optimizer="sgd") as peer, running_peer(optimizer="sgd", forward_cache_mb=0) as plain:
        import grpc

        from proto import expert_pb2_grpc

        x, grad = torch.randn(5, 16), torch.randn(5, 16)
        answers = []
        for p in (peer, plain):
            with grpc.insecure_channel(p.endpoint) as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                request = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x)], forward_id=42)
                stub.Forward(request, timeout=10)
                backward = expert_pb2.ExpertRequest(
                    uid="ffn.0", tensors=[serialize_tensor(x), serialize_tensor(grad)], forward_id=42
                )
                answers.append(stub.Backward(backward, timeout=10))
                answers.append(forward(stub, "ffn.0", x)[0])  # after the step
        assert peer.graphs.hits == 1 and plain.graphs.hits == 0 and len(peer.graphs) == 0
        assert answers[0] == answers[2]  # identical input gradients, bit for bit
        torch.testing.assert_close(answers[1], answers[3])  # and the same step
