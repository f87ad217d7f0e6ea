"""Replicas of one expert become one expert again: capture, average and apply their states."""

from __future__ import annotations

import pytest
import torch

from peer.backend import ExpertBackend
from peer.experts import get_expert_class
from peer.replica_state import ExpertState, apply_average, average, capture, restore

HIDDEN = 8


def make_backend(seed: int, optimizer: str = "adam") -> ExpertBackend:
    return ExpertBackend("ffn.0", get_expert_class("ffn"), HIDDEN, optimizer=optimizer, lr=1e-2, seed=seed)


def train(backend: ExpertBackend, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, HIDDEN, generator=generator)
        backend.backward([x], [torch.randn(4, HIDDEN, generator=generator)])


def answer(backend: ExpertBackend) -> torch.Tensor:
    return backend.forward([torch.linspace(-1, 1, 2 * HIDDEN).reshape(2, HIDDEN)])[0]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_replicas_that_drifted_apart_answer_the_same_after_averaging(optimizer):
    a, b = make_backend(0, optimizer), make_backend(0, optimizer)
    train(a, 5, seed=1)
    train(b, 3, seed=2)
    assert not torch.equal(answer(a), answer(b))
    snapshots = [capture(a), capture(b)]
    mean = average(snapshots)
    for backend, snapshot in zip((a, b), snapshots, strict=True):
        apply_average(backend, snapshot, mean)
    assert torch.equal(answer(a), answer(b))
    assert a.update_count == b.update_count == 5
    # the optimizer moments agree too: the next identical update keeps them identical
    train(a, 1, seed=3)
    train(b, 1, seed=3)
    assert torch.equal(answer(a), answer(b))


def test_the_mean_is_the_mean_of_the_parameters():
    a, b = make_backend(1), make_backend(2)
    mean = average([capture(a), capture(b)])
    for name, value in a.module.state_dict().items():
        expected = (value + b.module.state_dict()[name]) / 2
        assert torch.allclose(mean.tensors["module." + name], expected, atol=1e-7)


def test_updates_made_after_the_snapshot_are_kept():
    a, b = make_backend(0), make_backend(5)
    snapshot_a, snapshot_b = capture(a), capture(b)
    train(a, 2, seed=4)  # a trains while the states travel
    mean = average([snapshot_a, snapshot_b])
    before = {k: v.clone() for k, v in a.module.state_dict().items()}
    apply_average(a, snapshot_a, mean)
    for name, value in a.module.state_dict().items():
        expected = before[name] + mean.tensors["module." + name] - snapshot_a.tensors["module." + name]
        assert torch.allclose(value, expected, atol=1e-6)
    assert a.update_count == 2


def test_restore_makes_a_fresh_replica_answer_like_the_live_one():
    live, fresh = make_backend(0), make_backend(9)
    train(live, 4, seed=1)
    restore(fresh, capture(live))
    assert torch.equal(answer(fresh), answer(live))
    assert fresh.update_count == 4
    train(live, 1, seed=7)
    train(fresh, 1, seed=7)
    assert torch.equal(answer(fresh), answer(live))


def test_a_state_of_another_size_is_refused_before_anything_changes():
    small, other = make_backend(0), ExpertBackend("ffn.0", get_expert_class("ffn"), HIDDEN * 2, seed=0)
    before = answer(small)
    with pytest.raises(ValueError, match="module"):
        restore(small, capture(other))
    assert torch.equal(answer(small), before)
    with pytest.raises(ValueError, match="optimizer entry"):
        restore(small, ExpertState(0, {**capture(small).tensors, "optimizer.99.exp_avg": torch.zeros(1)}))
