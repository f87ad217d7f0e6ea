"""The experts of one compute pass computed together: joint forwards (`peer.joint_forward`) and joint optimizer
steps (`peer.updates`) give each expert what its own computation gives."""

import copy
import math

import pytest
import torch

from peer.backend import ExpertBackend, run_backward
from peer.experts import get_expert_class
from peer.graphs import ForwardGraphStore
from peer.joint_forward import PendingForward, run_forwards
from peer.updates import apply_gradients


def _backends(count: int, expert_cls: str = "ffn", graphs: ForwardGraphStore | None = None, **options):
    return [
        ExpertBackend(f"e.{i}", get_expert_class(expert_cls), 16, seed=i, graphs=graphs, **options)
        for i in range(count)
    ]


@pytest.mark.parametrize("expert_cls", ["ffn", "swiglu"])
def test_forward_many_pads_each_modules_own_outputs(expert_cls):
    modules = [backend.module for backend in _backends(3, expert_cls)]
    xs = [torch.randn(n, 16) for n in (1, 4, 2)]
    (padded,) = type(modules[0]).forward_many(modules, [[x] for x in xs])
    assert padded.shape == (3, 4, 16)
    for row, (module, x) in enumerate(zip(modules, xs, strict=True)):
        torch.testing.assert_close(padded[row, : len(x)], module(x))


def test_a_joint_forward_and_backward_give_each_expert_its_own_gradients_and_step():
    alone = _backends(4, clip_grad_norm=1.0)
    together = _backends(4, graphs=ForwardGraphStore(1 << 24), clip_grad_norm=1.0)
    xs = [torch.randn(n, 16) for n in (1, 2, 2, 1)]
    grads = [torch.randn_like(x) * 10 for x in xs]  # large enough to be clipped
    outputs = [backend.forward([x])[0] for backend, x in zip(alone, xs, strict=True)]
    expected = [backend.backward([x], [g]) for backend, x, g in zip(alone, xs, grads, strict=True)]
    pieces = [PendingForward(backend, [x], 7) for backend, x in zip(together, xs, strict=True)]
    run_forwards(pieces)
    for piece, output in zip(pieces, outputs, strict=True):
        torch.testing.assert_close(piece.outputs[0], output)
    pending = [b.backward_begin([x], [g], 7) for b, x, g in zip(together, xs, grads, strict=True)]
    assert all(p.shared is pending[0].shared is not None for p in pending), "one graph for the four"
    run_backward(pending)
    assert together[0].graphs.hits == 4
    for backend, batch, reference, mine in zip(together, pending, alone, expected, strict=True):
        torch.testing.assert_close(backend.backward_end(batch)[0], mine[0])
        assert backend.update_count == reference.update_count == 1
        for a, b in zip(backend.module.parameters(), reference.module.parameters(), strict=True):
            torch.testing.assert_close(a, b)
            assert a.grad is None


def test_experts_computed_together_but_backpropagated_apart_recompute_and_keep_no_stray_gradient():
    alone = _backends(3)
    together = _backends(3, graphs=ForwardGraphStore(1 << 24))
    xs, grads = [torch.randn(2, 16) for _ in range(3)], [torch.randn(2, 16) for _ in range(3)]
    expected = [backend.backward([x], [g]) for backend, x, g in zip(alone, xs, grads, strict=True)]
    run_forwards([PendingForward(backend, [x], 3) for backend, x in zip(together, xs, strict=True)])
    first = [together[i].backward_begin([xs[i]], [grads[i]], 3) for i in (0, 1)]
    run_backward(first)
    assert all(p.grad is None for p in together[2].module.parameters()), "the absent expert got no gradient"
    late = together[2].backward_begin([xs[2]], [grads[2]], 3)
    assert late.shared is None and together[2].graphs.misses == 1, "its share of the used graph is recomputed"
    run_backward([late])
    results = [together[0].backward_end(first[0]), together[1].backward_end(first[1]), together[2].backward_end(late)]
    for backend, reference, mine, theirs in zip(together, alone, results, expected, strict=True):
        torch.testing.assert_close(mine[0], theirs[0])
        assert backend.update_count == 1
        for a, b in zip(backend.module.parameters(), reference.module.parameters(), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_joint_updates_clip_reject_and_step_each_expert_as_torch_would(optimizer, caplog):
    backends = _backends(3, optimizer=optimizer, clip_grad_norm=0.5, reject_grad_norm=1e6)
    reference = [copy.deepcopy(backend) for backend in backends]
    for round_ in range(2):  # Adam's first step does not depend on the gradient's scale; its second does
        for index, (mine, theirs) in enumerate(zip(backends, reference, strict=True)):
            torch.manual_seed(10 * round_ + index)
            for a, b in zip(mine.module.parameters(), theirs.module.parameters(), strict=True):
                a.grad = torch.randn_like(a) * (1e9 if index == 1 else 0.02 + round_)  # expert 1's is rejected
                b.grad = a.grad.clone()
        apply_gradients(backends)
        for index, theirs in enumerate(reference):
            norm = torch.nn.utils.clip_grad_norm_(list(theirs.module.parameters()), 0.5)
            if index != 1:
                theirs.optimizer.step()
            theirs.optimizer.zero_grad()
            assert math.isfinite(norm)
    assert [b.update_count for b in backends] == [2, 0, 2] and backends[1].updates_skipped == 2
    assert "skipped an update" in caplog.text
    for mine, theirs in zip(backends, reference, strict=True):
        for a, b in zip(mine.module.parameters(), theirs.module.parameters(), strict=True):
            torch.testing.assert_close(a, b)
            assert a.grad is None
        assert set(mine.optimizer.state_dict()["state"]) == set(theirs.optimizer.state_dict()["state"])
