"""Experts of a Hugging Face MoE checkpoint, hosted one by one: `dmoe peer --hf-model DIR --experts 'P.[0:L].[0:E]'`.

Uid `P.L.E` is routed expert E of decoder layer L (see `models.hf_families`). A peer reads only the tensors of the
experts it hosts, straight from the safetensors files (`safe_open(...).get_slice`: one row of a fused 3-D tensor,
or an expert's own 2-D tensors), so its memory is those experts' bytes plus the usual base, never the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dht import split_uid
from models.hf_families import CheckpointTensors, ExpertTensors, HFMoEModel, load_hf_config
from peer.experts import ExpertClass

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`--dtype` names; `auto` keeps the checkpoint's own dtype."""


class HFExpert(nn.Module):
    """One routed expert of a Hugging Face MoE model: `down(act(gate x) * up x)`, as the family's experts compute.

    `gate_up_proj` `[2I, H]` holds the gate rows, then the up rows, and `down_proj` is `[H, I]`: the same tensors
    and the same operations as row e of the family's fused `experts` module, so a token's output equals the
    local model's for that expert (the routing weight is applied by the client). Inputs `[tokens, H]` must have
    the parameters' dtype.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The expert's output for each token (unweighted)."""
        gate, up = nn.functional.linear(hidden_states, self.gate_up_proj).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj)


class HFCheckpointExperts:
    """The routed experts of one checkpoint folder, built on demand from only their own tensors.

    `dtype` is `auto` (each tensor keeps the checkpoint's dtype: bf16 stays bf16) or a name in `DTYPES`.
    `check(uids)` raises ValueError for a uid that is not an expert of this checkpoint; `expert_class(uid)` is the
    `ExpertClass` the peer builds uid's backend from (its module loads that expert's weights).
    """

    def __init__(self, folder: str | Path, *, dtype: str = "auto"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"--hf-model {folder}: no such folder")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
        self.model = HFMoEModel.from_config(load_hf_config(self.folder))
        self.tensors = CheckpointTensors(self.folder)
        self.dtype = None if dtype == "auto" else DTYPES[dtype]
        self.name = f"hf-{self.model.family.model_type}"
        """The expert class name in the DHT records and checkpoints."""

    @property
    def hidden_size(self) -> int:
        """Hidden size of the model: every expert's input and output width."""
        return self.model.hidden_size

    def locate(self, uid: str) -> ExpertTensors:
        """Where the weights of `uid` (`PREFIX.L.E`) are; ValueError when it is no expert of this checkpoint."""
        _, coords = split_uid(uid)
        if len(coords) != 2:
            raise ValueError(f"expert {uid!r}: Hugging Face experts are PREFIX.LAYER.EXPERT, e.g. 'mixtral.0.3'")
        return self.tensors.locate_expert(self.model, *coords)

    def check(self, uids: list[str]) -> None:
        """ValueError naming the first uid this checkpoint has no expert for."""
        for uid in uids:
            self.locate(uid)

    def checkpoint_dtype(self, uid: str) -> torch.dtype:
        """The dtype `uid` is stored in."""
        from safetensors import safe_open

        where = self.locate(uid)
        with safe_open(self.tensors.files[where.down], framework="pt") as handle:
            stored = handle.get_slice(where.down).get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{uid} is stored as {stored}, which dmoe cannot serve: use a float32, bf16 or fp16 copy")
        return _SAFETENSORS_DTYPES[stored]

    def load(self, uid: str) -> HFExpert:
        """Build the expert `uid` from its own tensors only (one row of a fused tensor, or its own tensors)."""
        from safetensors import safe_open

        where = self.locate(uid)
        read: dict[str, torch.Tensor] = {}
        for path, keys in self.tensors.by_file(where.keys).items():
            with safe_open(path, framework="pt") as handle:
                for key in keys:
                    read[key] = handle.get_slice(key)[where.index] if where.fused else handle.get_tensor(key)
        if where.fused:
            gate_up = read[where.gate_up]
        else:
            gate_up = torch.cat([read[where.gate], read[where.up]], dim=0)
        down = read[where.down]
        if self.dtype is not None:
            gate_up, down = gate_up.to(self.dtype), down.to(self.dtype)
        return HFExpert(gate_up.contiguous(), down.contiguous(), self.model.hidden_act)

    def expert_class(self, uid: str) -> ExpertClass:
        """How the peer builds `uid`: its module from the checkpoint, sample inputs in the expert's dtype."""
        dtype = self.dtype or self.checkpoint_dtype(uid)

        def sample_input(batch_size: int, hidden_dim: int) -> tuple[torch.Tensor, ...]:
            return (torch.zeros(batch_size, hidden_dim, dtype=dtype),)

        return ExpertClass(self.name, lambda _hidden_dim: self.load(uid), sample_input)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
