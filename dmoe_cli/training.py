"""The client's jobs: train the reference model over a swarm (`dmoe train`) and sample from it (`dmoe infer`).

The loop is flat on purpose: sample a batch, forward, backward (the remote experts receive their gradients
and step their own optimizers on the peers), clip, step AdamW on the client's own weights, report, evaluate,
save. A step whose forward or backward raises (say, no expert answered) is skipped and leaves the weights
untouched; only `max_failed_steps` failures in a row stop training. Checkpoints hold the client's weights,
optimizer, step, data-sampler state and `ModelConfig`, written atomically (`peer.atomic_write_bytes`), so a
crash or Ctrl-C never leaves a torn file and `dmoe infer` can rebuild the model from the file alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dmoe_cli.config_args import config_field, nested_config
from dmoe_cli.plot import TrainingLog
from models import CharTransformer, ModelConfig, load_corpus, sample_batch, split_train_val
from peer import atomic_write_bytes
from router_client import RouterConfig

logger = logging.getLogger(__name__)

FFNFactory = Callable[[int], nn.Module]
CHECKPOINT_FORMAT = "dmoe-client-1"
SAMPLE_PROMPT = "def "


@dataclass
class TrainConfig:
    """Everything `dmoe train` needs: the swarm to join, the corpus, the model's shape, the loop's settings.

    `model` is the shape of the reference model and `router` how its layers reach the experts. Every field,
    theirs included, is also a `dmoe train` flag (`--batch-size` for `batch_size`, `--k-min` for
    `router.k_min`) and an environment variable (`DMOE_BATCH_SIZE`, `DMOE_K_MIN`); a flag wins over the
    variable, the variable over the default. `steps` is the step count to reach: a resumed run continues from
    the step saved in `checkpoint`.
    """

    initial_peers: list[str] = config_field((), "multiaddrs of DHT nodes of the swarm to train with", nargs="*")
    corpus: str | None = config_field(None, "text file or folder to train on (default: this Python's stdlib sources)")
    max_corpus_bytes: int = config_field(8_000_000, "read at most this many bytes of the corpus")
    steps: int = config_field(300, "train until the step counter reaches this (a resumed run counts its saved steps)")
    batch_size: int = config_field(16, "sequences per step")
    lr: float = config_field(3e-3, "AdamW learning rate of the client's own weights (the gates included)")
    weight_decay: float = config_field(0.01, "AdamW weight decay")
    grad_clip: float | None = config_field(1.0, "clip the client's gradient to this norm (none to disable)")
    max_failed_steps: int = config_field(20, "failed steps in a row (e.g. no expert answered) before training stops")
    checkpoint: str = config_field("runs/client.pt", "file for the client's weights, optimizer and step")
    resume: bool = config_field(True, "resume from --checkpoint when it exists")
    save_every: int = config_field(100, "steps between checkpoints (also saved at the end and on Ctrl-C)")
    eval_every: int = config_field(50, "steps between validation losses (0 disables)")
    eval_batches: int = config_field(4, "batches per validation loss")
    seed: int = config_field(0, "seed of the client's initial weights and of the batch sampler")
    threads: int | None = config_field(
        None,
        "torch intra-op threads of this process (default: torch's choice; 1 is "
        "often faster for this small model on a busy machine)",
    )
    sample_chars: int = config_field(200, "bytes of text to sample at the end of training (0 to skip)")
    log_csv: str | None = config_field(
        None, "append step, loss, tokens/s and elapsed seconds of every step here (CSV; JSON lines for .jsonl)"
    )
    model: ModelConfig = nested_config(ModelConfig, hidden=("vocab_size",))
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass
class InferConfig:
    """Everything `dmoe infer` needs: a client checkpoint, the swarm to ask, a prompt and sampling settings.

    The model's shape comes from the checkpoint; `router` is how its layers reach the experts (the backward
    knobs are no flags of `dmoe infer`: inference never runs a backward).
    """

    checkpoint: str = config_field("runs/client.pt", "client checkpoint written by `dmoe train`")
    prompt: str = config_field("def ", "text to continue")
    max_new_tokens: int = config_field(200, "bytes to generate")
    temperature: float = config_field(0.8, "sampling temperature; 0 picks the likeliest byte every time")
    top_k: int | None = config_field(None, "sample only among the k likeliest bytes (none: all)")
    seed: int | None = config_field(None, "seed for sampling (none: random)")
    initial_peers: list[str] = config_field(
        (), "multiaddrs of DHT nodes of the swarm that hosts the experts", nargs="*"
    )
    router: RouterConfig = nested_config(RouterConfig, hidden=("backward_k_min", "backward_timeout"))


def router_kwargs_from(config: TrainConfig | InferConfig) -> dict[str, Any]:
    """Keyword arguments for `RemoteMixtureOfExperts` taken from a job's config: its swarm and its router."""
    return dict(initial_peers=list(config.initial_peers) or None, config=config.router)


# ---- checkpoints -------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (`peer.atomic_write_bytes`): a reader sees the old file or the new one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialized first: a state that cannot be saved never touches the file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a client checkpoint (tensors and plain values only; nothing is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # not a torch file at all, or one holding more than tensors and plain values
        raise ValueError(f"{path} is not a dmoe client checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a dmoe client checkpoint (format {found!r})")
    return state


def load_model(
    path: str | os.PathLike, make_ffn: FFNFactory | None = None, router_kwargs: dict[str, Any] | None = None
) -> tuple[CharTransformer, dict[str, Any]]:
    """Rebuild the model saved in a client checkpoint; returns it (in eval mode) and the checkpoint."""
    state = load_checkpoint(path)
    model = CharTransformer(ModelConfig(**state["model_config"]), make_ffn=make_ffn, router_kwargs=router_kwargs)
    model.load_state_dict(state["model"])
    return model.eval(), state


# ---- training ----------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(model: CharTransformer, data: torch.Tensor, batches: int, batch_size: int, seed: int) -> float:
    """Mean cross-entropy (nats per byte) over `batches` batches drawn with a fixed seed (comparable over time)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        losses = []
        for _ in range(batches):
            x, y = sample_batch(data, batch_size, model.config.block_size, generator)
            model(x, y)
            losses.append(model.last_ce_loss.item())
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def expert_stats(model: CharTransformer) -> dict[str, float]:
    """The FFN layers' `.stats` counters (calls, failed expert calls, masked tokens, ...), summed over layers."""
    totals: dict[str, float] = {}
    for layer in model.ffn_layers:
        stats = getattr(layer, "stats", None)
        if stats is None:
            continue
        items = stats.items() if isinstance(stats, Mapping) else vars(stats).items()
        for name, value in items:
            if isinstance(value, int | float) and not isinstance(value, bool):
                totals[name] = totals.get(name, 0) + value
    return totals


def _without_secrets(train_config: dict[str, Any]) -> dict[str, Any]:
    """A `TrainConfig` as a dict, fit to be stored in a checkpoint: the swarm key left out."""
    return {**train_config, "router": {**train_config["router"], "swarm_key": None}}


def _count(stats: Mapping[str, float], word: str) -> int:
    return int(sum(value for name, value in stats.items() if word in name))


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the yielded event (the loop then saves and returns); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)
        logger.warning("Ctrl-C: saving after this step and stopping (Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(config: TrainConfig, *, make_ffn: FFNFactory | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the reference model on the corpus until `config.steps`, resuming from `config.checkpoint`.

    `make_ffn(layer_index)` replaces the FFN of each block (default: from `config.model.ffn`). Returns a summary:
    `step` (the step counter reached), `steps` (steps run by this call), `initial_loss` (training loss of this
    call's first step), `final_loss` (mean training loss of its last 10 steps), `val_loss` (at the end),
    `tokens_per_second`, `steps_per_second`, `elapsed` (seconds), `failed_steps`, `interrupted`,
    `expert_stats` (summed `.stats` of the FFN layers), `checkpoint`, and `sample` (prompt and sampled text,
    or None).
    """
    model_config = config.model
    if make_ffn is None and model_config.ffn == "remote" and not config.initial_peers:
        raise ValueError("training with remote experts needs initial_peers (--initial-peers); or use --ffn local")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_corpus(config.corpus, config.max_corpus_bytes)
    train_data, val_data = split_train_val(data)
    if len(val_data) <= model_config.block_size:
        val_data = train_data  # a tiny corpus: validate on the training text rather than fail
    torch.manual_seed(config.seed)
    model = CharTransformer(model_config, make_ffn=make_ffn, router_kwargs=router_kwargs_from(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    batch_rng = torch.Generator().manual_seed(config.seed)
    step = 0

    checkpoint = Path(config.checkpoint)
    if config.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        saved = ModelConfig(**state["model_config"])
        if saved != model_config:
            changed = {
                k: (v, getattr(model_config, k)) for k, v in vars(saved).items() if getattr(model_config, k) != v
            }
            raise ValueError(
                f"{checkpoint} holds a different model (saved vs asked: {changed}); "
                "use --no-resume or another --checkpoint"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batch_rng.set_state(state["batch_rng"])
        step = state["step"]
        logger.info("resumed %s at step %d", checkpoint, step)

    def save() -> None:
        save_checkpoint(
            checkpoint,
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model_config": dataclasses.asdict(model_config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "batch_rng": batch_rng.get_state(),
                "train_config": _without_secrets(dataclasses.asdict(config)),
            },
        )
        logger.debug("saved %s at step %d", checkpoint, step)

    def evaluate() -> float:
        try:
            return estimate_loss(model, val_data, config.eval_batches, config.batch_size, config.seed + 1)
        except Exception as error:  # a swarm hiccup must not end the run
            logger.warning("validation failed at step %d: %s", step, error)
            return math.nan

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %d local parameters; training steps %d..%d", model_config, n_params, step, config.steps)
    start_step, losses, failures, failed_steps, val_loss = step, [], 0, 0, math.nan
    evaluated_at = -1
    tokens_per_step = config.batch_size * model_config.block_size
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    curve = TrainingLog(config.log_csv) if config.log_csv else contextlib.nullcontext()
    with bar, logging_redirect_tqdm(), _stop_on_sigint() as stop, curve as curve_log:
        while step < config.steps and not stop.is_set():
            if config.eval_every and step % config.eval_every == 0 and step != evaluated_at:
                val_loss, evaluated_at = evaluate(), step
                logger.info("step %d: val loss %.4f", step, val_loss)
            step_started = time.perf_counter()
            x, y = sample_batch(train_data, config.batch_size, model_config.block_size, batch_rng)
            optimizer.zero_grad(set_to_none=True)
            try:  # the remote part of the step: nothing of the client's has changed if it raises
                _, loss = model(x, y)
                loss.backward()
            except Exception as error:
                failures, failed_steps = failures + 1, failed_steps + 1
                logger.warning("step %d failed (%d in a row): %r", step, failures, error)
                if failures >= config.max_failed_steps:
                    optimizer.zero_grad(set_to_none=True)
                    save()
                    message = f"{failures} steps failed in a row; saved step {step} to {checkpoint}"
                    raise RuntimeError(message) from error
                continue
            failures = 0
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            losses.append(model.last_ce_loss.item())
            stats = expert_stats(model)
            elapsed = time.perf_counter() - started
            if curve_log is not None:
                curve_log.write(step, losses[-1], tokens_per_step / (time.perf_counter() - step_started), elapsed)
            bar.update(1)
            bar.set_postfix(
                loss=f"{losses[-1]:.3f}",
                tok_s=f"{(step - start_step) * tokens_per_step / elapsed:.0f}",
                failed=_count(stats, "fail"),
                masked=_count(stats, "mask"),
                refresh=False,
            )
            if config.save_every and step % config.save_every == 0:
                save()
        interrupted = stop.is_set() and step < config.steps
        elapsed = time.perf_counter() - started
        if step > start_step or interrupted:
            save()
    if step > start_step and not interrupted:
        val_loss = evaluate()
        logger.info("step %d: val loss %.4f", step, val_loss)

    text = None
    if config.sample_chars > 0 and not interrupted:
        try:
            text = SAMPLE_PROMPT + _generate_text(model, SAMPLE_PROMPT, config.sample_chars, 0.8, seed=config.seed)
        except Exception as error:
            logger.warning("sampling failed: %s", error)
    steps_run = step - start_step
    return {
        "step": step,
        "steps": steps_run,
        "initial_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "val_loss": val_loss,
        "tokens_per_second": steps_run * tokens_per_step / elapsed if elapsed > 0 else 0.0,
        "steps_per_second": steps_run / elapsed if elapsed > 0 else 0.0,
        "elapsed": elapsed,
        "failed_steps": failed_steps,
        "interrupted": interrupted,
        "expert_stats": expert_stats(model),
        "checkpoint": str(checkpoint),
        "sample": text,
    }


# ---- inference ---------------------------------------------------------------------------------------------


def _generate_text(
    model: CharTransformer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """The continuation of `prompt`: `max_new_tokens` bytes decoded as UTF-8 (invalid bytes become U+FFFD)."""
    prompt_bytes = prompt.encode("utf-8") or b"\n"
    idx = torch.tensor([list(prompt_bytes)], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        model.train(was_training)
    return bytes(out[0, idx.shape[1] :].tolist()).decode("utf-8", errors="replace")


def sample(
    config_or_checkpoint_path: TrainConfig | InferConfig | str | os.PathLike,
    prompt: str = "def ",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    make_ffn: FFNFactory | None = None,
    *,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """Continue `prompt` with the model saved in a checkpoint; returns only the new text.

    Given a `TrainConfig` or `InferConfig`, its `checkpoint` and swarm settings are used; given a path, the
    router's defaults. The text is `max_new_tokens` bytes decoded as UTF-8 (invalid bytes become U+FFFD).
    """
    if isinstance(config_or_checkpoint_path, TrainConfig | InferConfig):
        path, router_kwargs = config_or_checkpoint_path.checkpoint, router_kwargs_from(config_or_checkpoint_path)
    else:
        path, router_kwargs = config_or_checkpoint_path, None
    model, _ = load_model(path, make_ffn=make_ffn, router_kwargs=router_kwargs)
    return _generate_text(model, prompt, max_new_tokens, temperature, top_k=top_k, seed=seed)


def infer(config: InferConfig, make_ffn: FFNFactory | None = None) -> str:
    """Run `dmoe infer`: the continuation of `config.prompt` sampled from `config.checkpoint`."""
    return sample(
        config, config.prompt, config.max_new_tokens, config.temperature, make_ffn, top_k=config.top_k, seed=config.seed
    )
