"""The Hugging Face MoE families dmoe runs over a swarm: how each names and stores its experts, in one table.

Every family here keeps, in memory (transformers 5.x), the experts of decoder layer L in one module
`model.layers.L.mlp.experts` that holds two 3-D tensors, `gate_up_proj` `[E, 2I, H]` (the gate rows first, then
the up rows) and `down_proj` `[E, H, I]`, and that the layer's sparse block calls as
`experts(hidden_states, top_k_index, top_k_weights)`. Expert e computes `down_e(act(gate_e x) * up_e x)` with
`act = ACT2FN[config.hidden_act]`. On disk a checkpoint stores them in one of two layouts:

- per expert (what `save_pretrained` writes by default, and the original checkpoints):
  `model.layers.L.<block>.experts.E.<gate>.weight` `[I, H]`, `<up>` `[I, H]`, `<down>` `[H, I]`, where the names
  are `w1`/`w3`/`w2` and the block `block_sparse_moe` for Mixtral, `gate_proj`/`up_proj`/`down_proj` and `mlp`
  for the others (transformers' `conversion_mapping.py` fuses them on load);
- fused (`save_pretrained(..., save_original_format=False)`): `model.layers.L.mlp.experts.gate_up_proj` and
  `model.layers.L.mlp.experts.down_proj`, as in memory.

Expert E of MoE layer L is the swarm uid `PREFIX.L.E` (L counts decoder layers, so layers without experts, such as
DeepSeek's first dense ones, leave gaps). The peer reads this module only (no router_client, no modeling code);
`CheckpointTensors` tells both sides which file holds a tensor, also for sharded checkpoints
(`model.safetensors.index.json`). Adding a family is one `HFMoEFamily` entry in `FAMILIES`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FUSED_GATE_UP = "gate_up_proj"
FUSED_DOWN = "down_proj"
MEMORY_BLOCK = "mlp"
"""Name of the MoE block in a decoder layer in memory, for every family (on disk it may differ)."""


def _every_layer(_config: Any, _layer: int) -> bool:
    return True


def _qwen_moe_layer(config: Any, layer: int) -> bool:
    """Qwen-MoE: sparse unless listed in `mlp_only_layers`, on every `decoder_sparse_step`-th layer."""
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer not in mlp_only and config.num_experts > 0 and (layer + 1) % step == 0


def _deepseek_moe_layer(config: Any, layer: int) -> bool:
    """DeepSeek: the first `first_k_dense_replace` layers are dense."""
    return layer >= (getattr(config, "first_k_dense_replace", 0) or 0)


@dataclass(frozen=True)
class HFMoEFamily:
    """One family of Hugging Face MoE models: where its experts are, what they compute, how they are stored.

    `num_experts` and `expert_width` name config attributes (experts per MoE layer; inner width I of one routed
    expert). `per_expert_names` are the gate, up and down projections of one expert in the per-expert layout on
    disk, `disk_blocks` the names the MoE block may have on disk (the first one, renamed, is `mlp` in memory).
    `is_moe_layer(config, layer)` says which decoder layers have routed experts. `kept_on_client` lists what else
    the sparse block holds (router, shared experts): it stays in the client's model.
    """

    model_type: str
    num_experts: str
    expert_width: str
    per_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    disk_blocks: tuple[str, ...] = (MEMORY_BLOCK,)
    is_moe_layer: Callable[[Any, int], bool] = _every_layer
    kept_on_client: tuple[str, ...] = ("gate",)

    def disk_renames(self) -> list[tuple[str, str]]:
        """(disk name, memory name) pairs for the MoE block of this family's non-expert tensors."""
        return [(f".{block}.", f".{MEMORY_BLOCK}.") for block in self.disk_blocks if block != MEMORY_BLOCK]


FAMILIES: dict[str, HFMoEFamily] = {
    family.model_type: family
    for family in (
        HFMoEFamily(
            "mixtral",
            "num_local_experts",
            "intermediate_size",
            per_expert_names=("w1", "w3", "w2"),
            disk_blocks=("block_sparse_moe", MEMORY_BLOCK),
        ),
        HFMoEFamily(
            "qwen2_moe",
            "num_experts",
            "moe_intermediate_size",
            is_moe_layer=_qwen_moe_layer,
            kept_on_client=("gate", "shared_expert", "shared_expert_gate"),
        ),
        HFMoEFamily("olmoe", "num_experts", "intermediate_size"),
        HFMoEFamily("qwen3_moe", "num_experts", "moe_intermediate_size", is_moe_layer=_qwen_moe_layer),
        HFMoEFamily(
            "deepseek_v3",
            "n_routed_experts",
            "moe_intermediate_size",
            is_moe_layer=_deepseek_moe_layer,
            kept_on_client=("gate", "shared_experts"),
        ),
    )
}

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.([A-Za-z_]+)\.experts\.")


def load_hf_config(path: str | Path) -> Any:
    """The `transformers` config of the checkpoint folder `path` (read locally, never from a hub)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face checkpoint folder (it has no config.json)")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def family_of(config: Any) -> HFMoEFamily:
    """The family of a config, or a ValueError naming the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None:
        raise ValueError(
            f"model type {getattr(config, 'model_type', '?')!r} is not a supported MoE family; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return family


@dataclass(frozen=True)
class HFMoEModel:
    """The expert grid of one checkpoint: its family, MoE layers, experts per layer, sizes and activation."""

    family: HFMoEFamily
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    hidden_size: int
    expert_width: int
    hidden_act: str
    top_k: int

    @classmethod
    def from_config(cls, config: Any) -> HFMoEModel:
        """Read the grid from a `transformers` config."""
        family = family_of(config)
        layers = int(config.num_hidden_layers)
        return cls(
            family=family,
            num_layers=layers,
            moe_layers=tuple(layer for layer in range(layers) if family.is_moe_layer(config, layer)),
            num_experts=int(getattr(config, family.num_experts)),
            hidden_size=int(config.hidden_size),
            expert_width=int(getattr(config, family.expert_width)),
            hidden_act=str(config.hidden_act),
            top_k=int(config.num_experts_per_tok),
        )

    @property
    def expert_parameters(self) -> int:
        """Parameters of one routed expert (gate, up and down): 3 · H · I."""
        return 3 * self.hidden_size * self.expert_width

    def uids(self, prefix: str) -> list[str]:
        """Every expert of the checkpoint as a swarm uid `PREFIX.L.E`, layer by layer."""
        prefix = prefix.rstrip(".")
        return [f"{prefix}.{layer}.{e}" for layer in self.moe_layers for e in range(self.num_experts)]

    def check_expert(self, layer: int, expert: int) -> None:
        """ValueError unless decoder layer `layer` has routed experts and `expert` is one of them."""
        if layer not in self.moe_layers:
            raise ValueError(
                f"layer {layer} of this {self.family.model_type} checkpoint has no routed experts; "
                f"its MoE layers are {_ranges(self.moe_layers)}"
            )
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} does not exist: MoE layers have experts 0 to {self.num_experts - 1}")


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    if list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(map(str, values))


def is_expert_tensor(key: str) -> bool:
    """Whether a checkpoint tensor belongs to routed experts (either layout); the client never reads those."""
    return _EXPERT_KEY.match(key) is not None


def memory_name(family: HFMoEFamily, key: str) -> str:
    """The in-memory parameter name of a non-expert checkpoint tensor (Mixtral's `block_sparse_moe` → `mlp`)."""
    for disk, memory in family.disk_renames():
        key = key.replace(disk, memory)
    return key


@dataclass(frozen=True)
class ExpertTensors:
    """Where one expert's weights are on disk: fused (`gate_up`, `down` are 3-D, row `index`) or per expert
    (`gate`, `up`, `down` are 2-D tensors of their own)."""

    fused: bool
    index: int
    gate_up: str | None = None
    gate: str | None = None
    up: str | None = None
    down: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        """The checkpoint tensors to read."""
        names = (self.gate_up,) if self.fused else (self.gate, self.up)
        return (*names, self.down)


class CheckpointTensors:
    """The tensor names of a safetensors checkpoint folder and the file that holds each.

    One `model.safetensors`, or shards listed by `model.safetensors.index.json`. Reads only the file headers.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / SAFETENSORS_INDEX
        single = self.folder / SAFETENSORS_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files: dict[str, Path] = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise ValueError(f"{self.folder} holds no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")

    def by_file(self, keys) -> dict[Path, list[str]]:
        """`keys` grouped by the file that holds them (so that each file is opened once)."""
        grouped: dict[Path, list[str]] = {}
        for key in keys:
            grouped.setdefault(self.files[key], []).append(key)
        return grouped

    def locate_expert(self, model: HFMoEModel, layer: int, expert: int) -> ExpertTensors:
        """Where expert `expert` of layer `layer` is stored; ValueError when the checkpoint lacks it."""
        model.check_expert(layer, expert)
        family = model.family
        for block in family.disk_blocks:
            base = f"model.layers.{layer}.{block}.experts"
            gate_up, down = f"{base}.{FUSED_GATE_UP}", f"{base}.{FUSED_DOWN}"
            if gate_up in self.files and down in self.files:
                return ExpertTensors(fused=True, index=expert, gate_up=gate_up, down=down)
            gate, up, down = (f"{base}.{expert}.{name}.weight" for name in family.per_expert_names)
            if all(key in self.files for key in (gate, up, down)):
                return ExpertTensors(fused=False, index=expert, gate=gate, up=up, down=down)
        raise ValueError(
            f"{self.folder} holds no weights for expert {expert} of layer {layer} "
            f"(looked for model.layers.{layer}.{{{','.join(family.disk_blocks)}}}.experts.*)"
        )
