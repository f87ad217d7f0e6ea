"""The reference model: a small byte-level GPT whose feed-forward layers are remote Mixtures of Experts.

In the style of nanoGPT: a config, then the modules in reading order. Each block is
`x + attn(ln(x))`, then `x + ffn(ln(x))`; the FFN of block `i` comes from `make_ffn(i)`, by default a
`RemoteMixtureOfExperts` whose experts live on volunteer peers. Pass a local stand-in (`local_ffn`) to run
the same model without a swarm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from router_client import RemoteMixtureOfExperts, config_field


@dataclass
class ModelConfig:
    """Shape of the reference model; saved in client checkpoints so `dmoe infer` can rebuild it.

    `grid_size`, `uid_prefix` and `k_best` describe the remote FFN: experts `uid_prefix.i[.j...]` on a grid of
    `grid_size`, `k_best` of them per token. Every layer routes over the same expert grid by default.
    """

    vocab_size: int = config_field(256, "token ids: one per byte value")
    block_size: int = config_field(64, "bytes per sequence (the model's context length)")
    n_layer: int = config_field(2, "transformer blocks, each with its own remote mixture of experts")
    n_head: int = config_field(4, "attention heads per block")
    n_embd: int = config_field(64, "width of the model; the peers' experts must have this --hidden-dim")
    dropout: float = config_field(0.0, "dropout of the client's own layers")
    grid_size: tuple[int, ...] = config_field(
        (8,), "expert grid: 8 for ffn.0..ffn.7, '4 4' for ffn.0.0..ffn.3.3", nargs="+"
    )
    uid_prefix: str = config_field("ffn", "uid prefix of the experts to route to")
    k_best: int = config_field(2, "experts each token is sent to")
    aux_loss_weight: float = config_field(0.01, "weight of the routers' load-balancing loss in the training loss")
    ffn: str = config_field(
        "remote", "FFN of each block: remote experts, or a local stand-in (no swarm)", choices=("remote", "local")
    )

    def __post_init__(self) -> None:
        self.grid_size = tuple(int(size) for size in self.grid_size)
        if self.ffn not in ("remote", "local"):
            raise ValueError(f"ffn must be 'remote' or 'local', got {self.ffn!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def local_ffn(n_embd: int, hidden_mult: int = 4) -> nn.Module:
    """A plain local feed-forward layer, the stand-in for a remote MoE when there is no swarm."""
    return nn.Sequential(nn.Linear(n_embd, hidden_mult * n_embd), nn.GELU(), nn.Linear(hidden_mult * n_embd, n_embd))


def default_ffn_factory(config: ModelConfig, /, **router_kwargs: Any) -> Callable[[int], nn.Module]:
    """The FFN factory that `config.ffn` names.

    "remote": a `RemoteMixtureOfExperts` per layer, built with `router_kwargs` (`initial_peers` or `dht`, and
    `config`, a `RouterConfig`, or its fields); "local": `local_ffn`.
    """
    if config.ffn == "local":
        return lambda layer_index: local_ffn(config.n_embd)

    def make_ffn(layer_index: int) -> nn.Module:
        return RemoteMixtureOfExperts(
            config.n_embd, config.grid_size, config.uid_prefix, config.k_best, **router_kwargs
        )

    return make_ffn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the positions before it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, C] -> [B, T, C]`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """A transformer block: attention then the (remote) FFN, each on a layer-normed residual branch."""

    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, C] -> [B, T, C]`."""
        x = x + self.attn(self.ln_1(x))
        x = x + self.ffn(self.ln_2(x))
        return x


class CharTransformer(nn.Module):
    """A byte-level GPT: token and position embeddings, `n_layer` blocks, a final norm, a head tied to the embedding.

    `make_ffn(layer_index)` supplies each block's FFN (default: `default_ffn_factory`, a
    `RemoteMixtureOfExperts` built with `router_kwargs`). The loss from `forward` adds `aux_loss_weight`
    times the sum of the FFN layers' `aux_loss` (their load-balancing loss of that forward, when they expose
    one; in training mode only, as a layer updates it only then); the plain cross-entropy of the last forward
    is kept in `last_ce_loss`.
    """

    def __init__(
        self,
        config: ModelConfig,
        make_ffn: Callable[[int], nn.Module] | None = None,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = config
        make_ffn = make_ffn or default_ffn_factory(config, **(router_kwargs or {}))
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, make_ffn(i)) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying
        self.last_ce_loss: torch.Tensor | None = None
        self._init_local_weights()

    def _init_local_weights(self) -> None:
        """GPT-2 initialisation of the client's own layers (the FFN layers keep theirs)."""
        local = [self.wte, self.wpe, self.ln_f] + [m for b in self.blocks for m in (b.ln_1, b.attn, b.ln_2)]
        for module in (m for part in local for m in part.modules()):
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # scaled init of the residual projections, as in GPT-2
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @property
    def ffn_layers(self) -> list[nn.Module]:
        """The FFN module of each block, in order."""
        return [block.ffn for block in self.blocks]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `[B, T, vocab]` for byte ids `idx [B, T]`, and the loss when `targets [B, T]` are given."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = self.last_ce_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux_losses = [aux for aux in (getattr(f, "aux_loss", None) for f in self.ffn_layers) if aux is not None]
        if aux_losses and self.config.aux_loss_weight and self.training:
            loss = loss + self.config.aux_loss_weight * torch.stack(aux_losses).sum()
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend `idx [B, T]` by `max_new_tokens` sampled bytes (greedy when `temperature <= 0`)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :]
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
