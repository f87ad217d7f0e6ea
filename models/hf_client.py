"""`load_hf_model`: a Hugging Face MoE checkpoint whose routed experts run on a dmoe swarm, everything else here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.hf_families import (
    MEMORY_BLOCK,
    CheckpointTensors,
    HFMoEFamily,
    HFMoEModel,
    is_expert_tensor,
    load_hf_config,
    memory_name,
)
from router_client import RouterConfig, remote_expert_layers

logger = logging.getLogger(__name__)


def load_hf_model(
    path: str | Path,
    *,
    uid_prefix: str,
    initial_peers=None,
    dht=None,
    dtype: torch.dtype | str | None = None,
    config: RouterConfig | None = None,
    **router_options: Any,
):
    """The checkpoint in folder `path` as a `transformers` `PreTrainedModel` whose routed experts are remote.

    Everything but the routed experts is built and loaded here from the checkpoint: embeddings, attention, norms,
    each MoE block's own router and any shared expert (Qwen2-MoE's `shared_expert` and `shared_expert_gate`,
    DeepSeek's `shared_experts`). The `experts` module of every MoE block is a `router_client.RemoteExperts` that
    calls the experts `PREFIX.L.E` (`uid_prefix`) of the swarm found through `initial_peers` (or `dht`) with the
    model's own top-k indices and weights. Expert tensors are never read or allocated here: the model is built on
    the meta device and only the other tensors are loaded. The result is a real `PreTrainedModel` (`generate`,
    KV cache and `labels=` loss work, `train()` fine-tunes the local weights with your optimizer and the experts
    on their peers), in eval mode.

    `dtype` (default: the checkpoint's) is the dtype of the local weights and of what travels to the experts;
    peers must host the experts in it (their `--dtype`, or the checkpoint's). The other keyword arguments are
    `RouterConfig` fields; `k_min` defaults to the model's top-k: every expert a token chose must answer.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    hf_config = load_hf_config(folder)
    grid = HFMoEModel.from_config(hf_config)
    dtype = _torch_dtype(dtype if dtype is not None else getattr(hf_config, "dtype", None))
    router_options.setdefault("k_min", grid.top_k)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    experts = remote_expert_layers(
        grid.hidden_size,
        grid.num_experts,
        uid_prefix,
        grid.moe_layers,
        num_layers=grid.num_layers,
        initial_peers=initial_peers,
        dht=dht,
        expert_dtype=dtype,
        config=config,
        **router_options,
    )
    for layer, remote in experts.items():
        block = model.get_submodule(f"model.layers.{layer}.{MEMORY_BLOCK}")
        if not isinstance(getattr(block, "experts", None), nn.Module):
            raise ValueError(f"layer {layer} of this {grid.family.model_type} model has no `experts` module")
        block.experts = remote
    _load_local_weights(model, folder, grid.family)
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model


def _torch_dtype(value: torch.dtype | str | None) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}: use float32, bfloat16 or float16")
    return dtype


def _load_local_weights(model: nn.Module, folder: Path, family: HFMoEFamily) -> None:
    """Fill every parameter and buffer of `model` that is still on the meta device from the checkpoint, reading
    no expert tensor; non-persistent buffers (rotary frequencies) are computed as transformers computes them.

    ValueError when the checkpoint lacks a tensor the model needs or holds one of another shape.
    """
    from safetensors import safe_open

    expected = model.state_dict()
    tensors = CheckpointTensors(folder)
    unexpected: list[str] = []
    for file, keys in tensors.by_file(key for key in tensors.files if not is_expert_tensor(key)).items():
        state: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                name = memory_name(family, key)
                target = expected.get(name)
                if target is None:
                    unexpected.append(key)
                    continue
                value = handle.get_tensor(key)
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{file.name}: {key} has shape {list(value.shape)}, the model expects "
                        f"{list(target.shape)} (a config.json that does not match the weights?)"
                    )
                state[name] = value.to(target.dtype)
        model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no place for: %s", len(unexpected), unexpected[:5])
    model.tie_weights()
    for module in model.modules():  # what is still on meta now is only computed, never stored: rotary frequencies
        computed = [
            name
            for name, buffer in module.named_buffers(recurse=False)
            if buffer.is_meta and name in module._non_persistent_buffers_set
        ]
        if computed:
            for name in computed:
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
            model._init_weights(module)
    missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:4])}")
