"""`dmoe generate`: greedy text from a Hugging Face MoE checkpoint whose routed experts run on a swarm.

The client loads everything but the experts from `--hf-model` (`router_client.load_hf_model`) and calls the experts
`UID_PREFIX.L.E` hosted by the swarm's peers (`dmoe swarm --hf-model`, or `dmoe peer --hf-model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dmoe_cli.config_args import add_config_arguments, config_from_args, nested_config
from dmoe_cli.config_args import config_field as _opt
from dmoe_cli.logs import setup_logging
from router_client.config import RouterConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class GenerateConfig:
    """What `dmoe generate` runs: the checkpoint, the swarm that hosts its experts, the prompt, how many tokens.

    Every chosen expert of every token must answer (k_min is the model's top-k); the router's deadlines and
    replica settings are the `RouterConfig` flags.
    """

    hf_model: str = _opt("", "Hugging Face MoE checkpoint folder (config.json, *.safetensors; a tokenizer optional)")
    uid_prefix: str = _opt("", "uid prefix the swarm hosts the experts under (expert E of layer L is PREFIX.L.E)")
    initial_peers: list[str] = _opt((), "multiaddrs of DHT nodes of the swarm", nargs="*", metavar="MADDR")
    prompt: str | None = _opt(None, "prompt text (needs a tokenizer in --hf-model)")
    prompt_ids: str | None = _opt(None, "prompt as token ids, e.g. 1,2,3 (instead of --prompt)")
    max_new_tokens: int = _opt(32, "tokens to generate (greedy)")
    dtype: str = _opt(
        "auto",
        "dtype of the local weights and of what is sent to the experts (auto: the checkpoint's)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    json: bool = _opt(False, 'print one line {"ids": [...], "tokens_per_second": ...} instead of the text')
    router: RouterConfig = nested_config(RouterConfig, hidden=("k_min", "backward_k_min", "backward_timeout"))


def parse_prompt_ids(text: str) -> list[int]:
    """`"1,2,3"` (commas or spaces) as a list of token ids; ValueError for anything else."""
    try:
        ids = [int(item) for item in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected token ids such as 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"--prompt-ids {text!r}: expected one or more non-negative token ids such as 1,2,3")
    return ids


def generate(config: GenerateConfig) -> dict:
    """Run the generation; returns `ids` (prompt and new tokens), `new_tokens`, `tokens_per_second` and `text`
    (None without a tokenizer)."""
    folder = Path(config.hf_model)
    if not config.hf_model:
        raise ValueError("--hf-model is required: the checkpoint folder whose experts the swarm hosts")
    if not config.uid_prefix:
        raise ValueError("--uid-prefix is required: the prefix the swarm hosts the experts under")
    if not config.initial_peers:
        raise ValueError("--initial-peers is required (or DMOE_INITIAL_PEERS): multiaddrs of the swarm's DHT")
    if (config.prompt is None) == (config.prompt_ids is None):
        raise ValueError("pass exactly one of --prompt TEXT and --prompt-ids 1,2,3")
    if config.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {config.max_new_tokens}")

    import torch

    from dht import DHTNode
    from models.hf_families import HFMoEModel, load_hf_config
    from router_client import load_hf_model

    top_k = HFMoEModel.from_config(load_hf_config(folder)).top_k
    tokenizer = _tokenizer(folder)
    if config.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{folder} has no tokenizer: pass the prompt as --prompt-ids 1,2,3")
        ids = tokenizer(config.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([parse_prompt_ids(config.prompt_ids)])
    router = dataclasses.replace(config.router, k_min=top_k)
    with DHTNode(initial_peers=list(config.initial_peers), client_mode=True) as node:
        model = load_hf_model(
            folder,
            uid_prefix=config.uid_prefix,
            dht=node,
            dtype=None if config.dtype == "auto" else config.dtype,
            config=router,
        )
        if ids.max() >= model.config.vocab_size:
            raise ValueError(f"--prompt-ids: token ids must be below the vocabulary size {model.config.vocab_size}")
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=config.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
    new_tokens = output.shape[1] - ids.shape[1]
    return {
        "ids": output[0].tolist(),
        "new_tokens": int(new_tokens),
        "tokens_per_second": round(new_tokens / elapsed, 2) if elapsed > 0 else None,
        "text": tokenizer.decode(output[0], skip_special_tokens=True) if tokenizer is not None else None,
    }


def _tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dmoe generate`: one per field of `GenerateConfig` and of its router config."""
    add_config_arguments(parser, GenerateConfig)


def run_generate_command(args: argparse.Namespace) -> int:
    """`dmoe generate`: print the text (or the ids, without a tokenizer), or one JSON line with `--json`."""
    setup_logging(getattr(args, "verbose", False))
    result = generate(config_from_args(GenerateConfig, args))
    if args.json:
        print(json.dumps({"ids": result["ids"], "tokens_per_second": result["tokens_per_second"]}), flush=True)
    elif result["text"] is not None:
        print(result["text"], flush=True)
    else:
        print(" ".join(map(str, result["ids"])), flush=True)
    return 0
