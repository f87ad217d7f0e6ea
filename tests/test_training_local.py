"""The client's training loop, checkpoints, sampling, corpus and job configs, with a local stand-in FFN (no network)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from dmoe_cli.config_args import (
    add_config_arguments,
    config_field,
    config_from_args,
    config_from_values,
    nested_config,
)
from dmoe_cli.demo import DemoConfig, add_demo_arguments
from dmoe_cli.jobs import add_infer_arguments, add_train_arguments
from dmoe_cli.training import (
    InferConfig,
    TrainConfig,
    infer,
    load_checkpoint,
    load_model,
    sample,
    save_checkpoint,
    train,
)
from models import CharTransformer, ModelConfig, load_corpus, sample_batch, split_train_val
from router_client import RouterConfig

N_EMBD = 32


def standin_ffn(layer_index: int) -> nn.Module:
    """A dense local FFN in place of the remote mixture of experts."""
    return nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD))


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A small `TrainConfig`; `overrides` are flat field names, those of its model and router included."""
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
    return config_from_values(TrainConfig, values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[TrainConfig, dict]:
    """100 steps of the reference model on the stdlib corpus, with the stand-in FFN."""
    config = small_config(tmp_path_factory.mktemp("trained"), eval_every=50)
    return config, train(config, make_ffn=standin_ffn, progress=False)


class FlakyFFN(nn.Module):
    """The stand-in FFN, raising on the calls whose number (from 1) is in `failing_calls`.

    A call in `failing_backward_calls` answers, but the backward through its answer raises (after the layers
    above it have got their gradients, so a wrong optimizer step would move them).
    """

    def __init__(
        self, failing_calls: set[int] | range, counter: list[int], failing_backward_calls: set[int] = frozenset()
    ):
        super().__init__()
        self.ffn, self.failing_calls, self.counter = standin_ffn(0), failing_calls, counter
        self.failing_backward_calls = failing_backward_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter[0] += 1
        if self.counter[0] in self.failing_calls:
            raise RuntimeError("no expert answered")
        y = self.ffn(x)
        if self.counter[0] in self.failing_backward_calls and y.requires_grad:
            y.register_hook(_raise_in_backward)
        return y


def _raise_in_backward(grad: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("no expert returned gradients")


def assert_sampled_from(model: CharTransformer, prompt: str, text: str, top_k: int) -> None:
    """Every byte of `text` is among the `top_k` likeliest bytes the model gives after `prompt` and what precedes."""
    assert "\ufffd" not in text, "the sample is not valid UTF-8: its bytes cannot be checked"
    context = list(prompt.encode() or b"\n")
    model.eval()
    with torch.no_grad():
        for byte in text.encode():
            logits, _ = model(torch.tensor([context[-model.config.block_size :]]))
            likeliest = logits[0, -1].topk(top_k).indices.tolist()
            assert byte in likeliest, f"byte {byte} after {bytes(context)!r} is not among the model's top {top_k}"
            context.append(byte)


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
    snapshots = []  # the client's weights at the start of every training forward (not the final validation's)

    def snapshot(module: nn.Module, args) -> None:
        if isinstance(module, CharTransformer) and module.training:
            snapshots.append({name: t.detach().clone() for name, t in module.state_dict().items()})

    # Two FFN calls per forward, one counter for both layers: forward 3 fails in its first FFN (call 5), and
    # the backward of forward 6 fails (through call 10, its first FFN); each step is redone with a new batch.
    counter = [0]
    hook = register_module_forward_pre_hook(snapshot)
    try:
        summary = train(
            small_config(tmp_path, steps=10),
            make_ffn=lambda i: FlakyFFN({5}, counter, failing_backward_calls={10}),
            progress=False,
        )
    finally:
        hook.remove()
    assert summary["step"] == 10 and summary["failed_steps"] == 2
    assert len(snapshots) == 12
    for index in range(len(snapshots) - 1):
        before, after = snapshots[index], snapshots[index + 1]
        if index in (2, 5):  # a failed step: the next attempt starts from the very same weights
            for name in before:
                torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
        else:  # a step that ran moved the weights
            assert any(not torch.equal(before[name], after[name]) for name in before), index
    state = load_checkpoint(small_config(tmp_path).checkpoint)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {10}  # AdamW stepped 10 times, not 12


def test_a_step_that_keeps_raising_stops_training_and_keeps_the_last_good_state(tmp_path):
    good = small_config(tmp_path / "good", steps=6)
    train(good, make_ffn=lambda i: FlakyFFN(set(), [0]), progress=False)

    failing = small_config(tmp_path / "failing", steps=20, max_failed_steps=3)
    counter = [0]  # two FFN calls per step: every call after step 6 fails
    with pytest.raises(RuntimeError, match="3 steps failed in a row"):
        train(failing, make_ffn=lambda i: FlakyFFN(range(13, 10**6), counter), progress=False)
    assert_same_state(load_checkpoint(good.checkpoint), load_checkpoint(failing.checkpoint))


def test_the_checkpoint_keeps_the_job_config_but_never_the_swarm_key(tmp_path):
    config = small_config(tmp_path, steps=1, swarm_key="secret", k_min=2)
    train(config, make_ffn=standin_ffn, progress=False)
    saved = load_checkpoint(config.checkpoint)["train_config"]
    assert saved["router"]["swarm_key"] is None and saved["router"]["k_min"] == 2
    assert saved["model"]["n_embd"] == N_EMBD and saved["steps"] == 1


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "client.pt"
    save_checkpoint(path, {"format": "dmoe-client-1", "step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        save_checkpoint(path, {"format": "dmoe-client-1", "step": 2, "oops": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["client.pt"]  # no temporary file left behind


# ---- sampling ----------------------------------------------------------------------------------------------


def test_sampled_text_is_a_function_of_the_seed_and_the_model(trained, tmp_path):
    config, _ = trained
    text = sample(config.checkpoint, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=0)
    assert isinstance(text, str) and len(text) == 60
    assert text == sample(config, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=0)
    assert text != sample(config, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=1)
    model, _ = load_model(config.checkpoint, make_ffn=standin_ffn)
    assert_sampled_from(model, "def ", text, top_k=5)

    state = load_checkpoint(config.checkpoint)  # the same checkpoint with other weights samples other text
    generator = torch.Generator().manual_seed(1)
    state["model"] = {name: torch.randn(t.shape, generator=generator) for name, t in state["model"].items()}
    other = tmp_path / "other.pt"
    save_checkpoint(other, state)
    assert text != sample(other, "def ", 60, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=0)


def test_infer_continues_the_prompt_from_the_checkpoint(trained):
    config, _ = trained
    infer_config = InferConfig(checkpoint=config.checkpoint, prompt="import ", max_new_tokens=25, top_k=5, seed=3)
    text = infer(infer_config, make_ffn=standin_ffn)
    assert len(text) == 25
    assert text == sample(config.checkpoint, "import ", 25, temperature=0.8, make_ffn=standin_ffn, top_k=5, seed=3)
    model, _ = load_model(config.checkpoint, make_ffn=standin_ffn)
    assert_sampled_from(model, "import ", text, top_k=5)
    assert text != infer(dataclasses.replace(infer_config, prompt="class "), make_ffn=standin_ffn)


def test_a_local_ffn_checkpoint_samples_without_a_factory(tmp_path):
    config = small_config(tmp_path, steps=3, ffn="local")
    train(config, progress=False)
    assert load_checkpoint(config.checkpoint)["model_config"]["ffn"] == "local"
    model, _ = load_model(config.checkpoint)
    assert all(isinstance(ffn, nn.Sequential) for ffn in model.ffn_layers)
    text = sample(config.checkpoint, "", 10, temperature=0.0)
    assert len(text) <= 10 and text == sample(config.checkpoint, "", 10, temperature=0.0)
    assert_sampled_from(model, "", text, top_k=1)  # temperature 0: the likeliest byte every time


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


# ---- job configs -------------------------------------------------------------------------------------------


def parser_with(add_arguments) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def normalized(text: str) -> str:
    return " ".join(text.split())


def test_one_default_per_knob_the_jobs_route_as_the_router_does():
    assert TrainConfig().router == InferConfig().router == DemoConfig().train.router == RouterConfig()
    assert RouterConfig().allow_zero_outputs is False
    assert TrainConfig().model == ModelConfig()


def test_train_flags_and_variables_reach_the_nested_router_and_model(monkeypatch):
    monkeypatch.setenv("DMOE_FORWARD_TIMEOUT", "2.5")
    monkeypatch.setenv("DMOE_N_LAYER", "3")
    args = parser_with(add_train_arguments).parse_args(["--k-min", "2", "--grid-size", "4", "4", "--steps", "7"])
    config = config_from_args(TrainConfig, args)
    assert config.steps == 7
    assert config.router == dataclasses.replace(RouterConfig(), k_min=2, forward_timeout=2.5)
    assert config.model == ModelConfig(n_layer=3, grid_size=(4, 4))
    assert config_from_args(TrainConfig, parser_with(add_train_arguments).parse_args(["--no-resume"])).resume is False


def test_train_help_lists_every_router_knob_with_its_help_and_infer_the_ones_it_uses():
    train_help = normalized(parser_with(add_train_arguments).format_help())
    infer_help = normalized(parser_with(add_infer_arguments).format_help())
    for field in dataclasses.fields(RouterConfig):
        flag, help_text = "--" + field.name.replace("_", "-"), normalized(field.metadata["help"])
        assert f"{flag} " in train_help and help_text in train_help, field.name
        if field.name in ("backward_k_min", "backward_timeout"):
            assert f"{flag} " not in infer_help, field.name  # inference never runs a backward
        else:
            assert f"{flag} " in infer_help and help_text in infer_help, field.name


def test_the_demo_trains_with_its_own_defaults_and_sets_the_swarm_fields_itself(monkeypatch):
    monkeypatch.delenv("DMOE_STEPS", raising=False)
    parser = parser_with(add_demo_arguments)
    config = config_from_args(DemoConfig, parser.parse_args(["--k-min", "2", "--batch-size", "8"]))
    assert config.train == dataclasses.replace(
        DemoConfig().train, batch_size=8, router=dataclasses.replace(RouterConfig(), k_min=2)
    )
    assert (config.train.steps, config.train.threads, config.train.eval_every) == (600, 1, 100)
    assert TrainConfig().steps == 300 and TrainConfig().threads is None  # the override did not leak
    assert config_from_args(DemoConfig, parser.parse_args(["--steps", "60"])).train.steps == 60
    demo_help = normalized(parser.format_help())
    assert "--steps STEPS" in demo_help and "[DMOE_STEPS; default: 600]" in demo_help
    for flag in ("--n-embd", "--grid-size", "--initial-peers", "--checkpoint", "--sample-chars"):
        assert f"{flag} " not in demo_help, flag


@dataclasses.dataclass
class Shadowing:
    """A config whose field has the name of a `RouterConfig` field."""

    k_min: int = config_field(1, "shadows RouterConfig.k_min")


@dataclasses.dataclass
class Clashing:
    """A job config nesting two configs that both have `k_min`."""

    inner: Shadowing = dataclasses.field(default_factory=Shadowing)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)


def test_a_flag_name_found_at_two_levels_is_refused_when_the_parser_is_built():
    with pytest.raises(ValueError, match=r"--k-min would set both Clashing\.inner\.k_min and Clashing\.router\.k_min"):
        add_config_arguments(argparse.ArgumentParser(), Clashing)
    with pytest.raises(ValueError, match="no such field"):
        nested_config(TrainConfig, stepz=3)


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
