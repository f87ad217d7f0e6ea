"""The client's training loop, checkpoints, sampling and corpus, with a local stand-in FFN (no network)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from router_client.corpus import load_corpus, sample_batch, split_train_val
from router_client.model import CharTransformer, ModelConfig
from router_client.training import (
    InferConfig,
    TrainConfig,
    infer,
    load_checkpoint,
    sample,
    save_checkpoint,
    train,
)

N_EMBD = 32


def standin_ffn(layer_index: int) -> nn.Module:
    """A dense local FFN in place of the remote mixture of experts."""
    return nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD))


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        checkpoint=str(tmp_path / "client.pt"),
        max_corpus_bytes=1_000_000,
        steps=100,
        batch_size=16,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_embd=N_EMBD,
        eval_every=0,
        save_every=0,
        sample_chars=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[TrainConfig, dict]:
    """100 steps of the reference model on the stdlib corpus, with the stand-in FFN."""
    config = small_config(tmp_path_factory.mktemp("trained"), eval_every=50)
    return config, train(config, make_ffn=standin_ffn, progress=False)


class FlakyFFN(nn.Module):
    """The stand-in FFN, raising on the calls whose number (from 1) is in `failing_calls`."""

    def __init__(self, failing_calls: set[int] | range, counter: list[int]):
        super().__init__()
        self.ffn, self.failing_calls, self.counter = standin_ffn(0), failing_calls, counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter[0] += 1
        if self.counter[0] in self.failing_calls:
            raise RuntimeError("no expert answered")
        return self.ffn(x)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], msg=name)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


# ---- training ----------------------------------------------------------------------------------------------


def test_loss_falls_over_100_steps_on_the_stdlib_corpus(trained):
    _, summary = trained
    assert summary["step"] == summary["steps"] == 100
    assert summary["initial_loss"] > 5.0  # ~ln(256): a fresh model knows nothing
    assert summary["final_loss"] < summary["initial_loss"] - 1.5
    assert summary["val_loss"] < 3.5
    assert summary["failed_steps"] == 0 and not summary["interrupted"]
    assert summary["tokens_per_second"] > 0


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    straight = small_config(tmp_path / "straight", steps=20)
    train(straight, make_ffn=standin_ffn, progress=False)

    split = small_config(tmp_path / "split", steps=10)
    train(split, make_ffn=standin_ffn, progress=False)
    assert load_checkpoint(split.checkpoint)["step"] == 10
    summary = train(dataclasses.replace(split, steps=20), make_ffn=standin_ffn, progress=False)
    assert summary["steps"] == 10 and summary["step"] == 20

    assert_same_state(load_checkpoint(straight.checkpoint), load_checkpoint(split.checkpoint))


def test_a_finished_run_resumes_without_training_again(tmp_path):
    config = small_config(tmp_path, steps=5)
    train(config, make_ffn=standin_ffn, progress=False)
    before = load_checkpoint(config.checkpoint)
    summary = train(config, make_ffn=standin_ffn, progress=False)
    assert summary["steps"] == 0 and summary["step"] == 5
    assert_same_state(before, load_checkpoint(config.checkpoint))


def test_resuming_a_checkpoint_of_another_model_is_refused(tmp_path):
    train(small_config(tmp_path, steps=2), make_ffn=standin_ffn, progress=False)
    with pytest.raises(ValueError, match="different model"):
        train(small_config(tmp_path, steps=4, n_layer=1), make_ffn=standin_ffn, progress=False)


def test_failed_steps_are_skipped_and_leave_the_weights_alone(tmp_path):
    counter = [0]  # shared by both layers: calls 5 and 8 fail, so steps 3 and 4 each fail once and are redone
    summary = train(small_config(tmp_path, steps=10), make_ffn=lambda i: FlakyFFN({5, 8}, counter), progress=False)
    assert summary["step"] == 10 and summary["failed_steps"] == 2


def test_a_step_that_keeps_raising_stops_training_and_keeps_the_last_good_state(tmp_path):
    good = small_config(tmp_path / "good", steps=6)
    train(good, make_ffn=lambda i: FlakyFFN(set(), [0]), progress=False)

    failing = small_config(tmp_path / "failing", steps=20, max_failed_steps=3)
    counter = [0]  # two FFN calls per step: every call after step 6 fails
    with pytest.raises(RuntimeError, match="3 steps failed in a row"):
        train(failing, make_ffn=lambda i: FlakyFFN(range(13, 10**6), counter), progress=False)
    assert_same_state(load_checkpoint(good.checkpoint), load_checkpoint(failing.checkpoint))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "client.pt"
    save_checkpoint(path, {"format": "dmoe-client-1", "step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        save_checkpoint(path, {"format": "dmoe-client-1", "step": 2, "oops": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["client.pt"]  # no temporary file left behind


# ---- sampling ----------------------------------------------------------------------------------------------


def test_sample_returns_text_of_the_requested_length(trained):
    config, _ = trained
    text = sample(config.checkpoint, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=0)
    assert isinstance(text, str) and len(text) == 60
    assert text == sample(config, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=0)


def test_infer_continues_the_prompt_from_the_checkpoint(trained):
    config, _ = trained
    infer_config = InferConfig(checkpoint=config.checkpoint, prompt="import ", max_new_tokens=25, top_k=5, seed=3)
    assert len(infer(infer_config, make_ffn=standin_ffn)) == 25


def test_a_local_ffn_checkpoint_samples_without_a_factory(tmp_path):
    config = small_config(tmp_path, steps=3, ffn="local")
    train(config, progress=False)
    assert load_checkpoint(config.checkpoint)["model_config"]["ffn"] == "local"
    assert len(sample(config.checkpoint, "", 10, temperature=0.0)) <= 10


def test_model_adds_the_ffn_layers_aux_loss_while_training():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn, self.aux_loss = standin_ffn(0), torch.tensor(2.0)

        def forward(self, x):
            return self.ffn(x)

    model = CharTransformer(ModelConfig(n_embd=N_EMBD, block_size=16, aux_loss_weight=0.5), lambda i: WithAux())
    x = torch.randint(256, (2, 16))
    _, loss = model(x, x)
    torch.testing.assert_close(loss, model.last_ce_loss + 0.5 * 2.0 * 2)
    model.eval()
    _, loss = model(x, x)
    torch.testing.assert_close(loss, model.last_ce_loss)


# ---- corpus ------------------------------------------------------------------------------------------------


def test_the_stdlib_corpus_is_deterministic_and_capped():
    first = load_corpus(max_bytes=200_000)
    assert first.dtype == torch.uint8 and len(first) == 200_000
    assert torch.equal(first, load_corpus(max_bytes=200_000))
    assert torch.equal(load_corpus(max_bytes=50_000), first[:50_000])


def test_a_user_folder_is_read_in_sorted_order_without_binary_files(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third ü\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    data = load_corpus(str(tmp_path))
    assert bytes(data.tolist()) == "first\nsecond\nthird ü\n".encode()
    assert bytes(load_corpus(str(tmp_path / "b.txt")).tolist()) == b"second\n"
    assert len(load_corpus(str(tmp_path), max_bytes=8)) == 8


def test_a_path_without_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(tmp_path))
    (tmp_path / "blob").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))


def test_batches_are_windows_with_next_byte_targets():
    data = torch.arange(100, dtype=torch.uint8)
    train_data, val_data = split_train_val(data, val_fraction=0.1)
    assert len(train_data) == 90 and len(val_data) == 10
    x, y = sample_batch(train_data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    assert int(y.max()) < 90
    with pytest.raises(ValueError, match="too short"):
        sample_batch(val_data, 1, 10)
