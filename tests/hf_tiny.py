"""Tiny random Hugging Face MoE checkpoints of every family dmoe supports, built offline with the config classes.

`build_tiny(family, folder, layout=...)` saves a model with `save_pretrained`: `per_expert` (transformers'
default, the original per-expert names), `fused` (`save_original_format=False`: 3-D `gate_up_proj`/`down_proj`)
or `sharded` (per expert, in several files with `model.safetensors.index.json`). Weights are drawn larger than
the families' own initialisation, so that logits are far apart and greedy decoding is a real check.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # greedy generation always runs max_new_tokens
)


def tiny_config(family: str, *, hidden_size: int = 32, expert_width: int = 24, num_experts: int = 4, layers: int = 2):
    """The config of a tiny model of `family` (mixtral, qwen2_moe, olmoe, qwen3_moe, deepseek_v3)."""
    import transformers

    common = {**COMMON, "hidden_size": hidden_size, "num_hidden_layers": layers}
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=expert_width, num_local_experts=num_experts)
    if family == "qwen2_moe":  # layer 1 dense, so the uids of layer 2 follow a gap; a shared expert on the client
        return transformers.Qwen2MoeConfig(
            **{**common, "num_hidden_layers": max(layers, 3)},
            intermediate_size=2 * expert_width,
            moe_intermediate_size=expert_width,
            shared_expert_intermediate_size=2 * expert_width,
            num_experts=num_experts,
            mlp_only_layers=[1],
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=expert_width, num_experts=num_experts)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=hidden_size // COMMON["num_attention_heads"],
            intermediate_size=2 * expert_width,
            moe_intermediate_size=expert_width,
            num_experts=num_experts,
        )
    if family == "deepseek_v3":  # layer 0 dense (first_k_dense_replace), MLA attention, one shared expert
        return transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": COMMON["num_attention_heads"]},
            intermediate_size=2 * expert_width,
            moe_intermediate_size=expert_width,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    raise ValueError(f"no tiny config for {family!r}")


FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3")


def build_tiny(family: str, folder: str | Path, *, layout: str = "per_expert", seed: int = 0, **sizes) -> Path:
    """Save a random tiny `family` model to `folder` in `layout`; returns the folder."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family, **sizes), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    kwargs = {}
    if layout == "fused":
        kwargs["save_original_format"] = False
    elif layout == "sharded":
        kwargs["max_shard_size"] = "40KB"
    elif layout != "per_expert":
        raise ValueError(f"unknown layout {layout!r}")
    model.save_pretrained(folder, **kwargs)
    return folder
