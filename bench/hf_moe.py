"""hf_moe: decode and prefill tokens/s of a Hugging Face MoE (Mixtral) with its experts on a local swarm, against the
same checkpoint run whole in this process.

Two random checkpoints: `big` (8 layers, hidden 512, 8 experts of inner width 1024, top-2: experts that compute)
and `tiny` (2 layers, hidden 32: the figure is pure overhead). The swarm is `dmoe swarm --hf-model` with 2 peers
(every expert once, frozen, one compute thread each); the client and the local model use one torch thread.
Greedy decoding with the KV cache sends each MoE layer one request per chosen expert per token, so
`round trip per MoE layer = (swarm decode s/token - local decode s/token) / MoE layers` is what the swarm adds to
each token at each layer (on loopback; across a WAN add the network's round trip per layer). Every figure is the
best of `reps` runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    "big": dict(layers=8, hidden=512, width=1024, experts=8, vocab=1024),
    "tiny": dict(layers=2, hidden=32, width=24, experts=4, vocab=96),
}
QUICK_MODELS = {
    "big": dict(layers=2, hidden=256, width=512, experts=8, vocab=512),
    "tiny": MODELS["tiny"],
}


def build_checkpoint(folder: Path, *, layers: int, hidden: int, width: int, experts: int, vocab: int) -> Path:
    """A random Mixtral checkpoint (top-2) saved with `save_pretrained`."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def _workloads(model, *, prompt_tokens: int, short: int, long: int, vocab: int) -> dict:
    """The three timed jobs on one model: a prefill of the prompt, and greedy decodes of `short` and `long` tokens."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, vocab, (1, prompt_tokens), generator=generator)
    start = prompt[:, :4]

    def prefill() -> None:
        with torch.no_grad():
            model(prompt)

    def decode(n: int):
        def run() -> None:
            with torch.no_grad():
                model.generate(start, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        return run

    return {"prefill": prefill, "short": decode(short), "long": decode(long)}


def _measure(models: dict, *, prompt_tokens: int, short: int, long: int, reps: int, vocab: int) -> dict:
    """Per model: prefill tokens/s and decode seconds per token, each the best of `reps` runs, the models' runs
    interleaved so that a busy moment of the machine hits both alike."""
    jobs = {
        side: _workloads(model, prompt_tokens=prompt_tokens, short=short, long=long, vocab=vocab)
        for side, model in models.items()
    }
    for side_jobs in jobs.values():
        side_jobs["short"]()  # warm up: channels, caches, the listing of experts
    best = {side: {job: float("inf") for job in side_jobs} for side, side_jobs in jobs.items()}
    for _ in range(reps):
        for side, side_jobs in jobs.items():
            for job, fn in side_jobs.items():
                started = time.perf_counter()
                fn()
                best[side][job] = min(best[side][job], time.perf_counter() - started)
    return {
        side: {
            "prefill_tokens_per_s": prompt_tokens / times["prefill"],
            "decode_s_per_token": (times["long"] - times["short"]) / (long - short),
        }
        for side, times in best.items()
    }


def run(ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from dmoe_cli.swarm import LocalSwarm, SwarmConfig
    from router_client import load_hf_model

    torch.set_num_threads(1)
    models = QUICK_MODELS if ctx.quick else MODELS
    prompt_tokens, short, long, reps = (16, 2, 6, 2) if ctx.quick else (64, 4, 20, 5)
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="dmoe-bench-hf-"))
    for name, shape in models.items():
        folder = build_checkpoint(workdir / name, **shape)
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        config = SwarmConfig(
            peers=2,
            replicas=1,
            hf_model=str(folder),
            uid_prefix=f"bench{name}",
            log_dir=str(workdir / f"{name}-logs"),
            extra_peer_args=["--optimizer", "none", "--compute-threads", "1"],
        )
        ctx.log(f"hf_moe: {name}: {shape}; starting a swarm of 2 peers")
        with LocalSwarm(config) as swarm:
            remote = load_hf_model(folder, uid_prefix=config.uid_prefix, initial_peers=swarm.initial_peers)
            sides = _measure(
                {"local": local, "swarm": remote},
                prompt_tokens=prompt_tokens,
                short=short,
                long=long,
                reps=reps,
                vocab=shape["vocab"],
            )
            ctx.log(f"hf_moe: {name}: {sides}")
        moe_layers = shape["layers"]
        added = sides["swarm"]["decode_s_per_token"] - sides["local"]["decode_s_per_token"]
        rows.append(
            {
                "model": name,
                **shape,
                "prompt_tokens": prompt_tokens,
                "sides": sides,
                "round_trip_per_moe_layer_ms": added / moe_layers * 1e3,
            }
        )
        del local
    config = {"peers": 2, "threads": 1, "top_k": 2, "reps": reps, "decode_tokens": [short, long]}
    return {"config": config, "rows": rows}


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "model",
        "layers × hidden × experts",
        "local decode tok/s",
        "swarm decode tok/s",
        "local prefill tok/s",
        "swarm prefill tok/s",
        "round trip per MoE layer per token ms",
    ]
    rows = []
    for row in result["rows"]:
        local, swarm = row["sides"]["local"], row["sides"]["swarm"]
        rows.append(
            [
                row["model"],
                f"{row['layers']} × {row['hidden']} × {row['experts']}",
                1 / local["decode_s_per_token"],
                1 / swarm["decode_s_per_token"],
                local["prefill_tokens_per_s"],
                swarm["prefill_tokens_per_s"],
                row["round_trip_per_moe_layer_ms"],
            ]
        )
    return headers, rows
