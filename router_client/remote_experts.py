"""`RemoteExperts`: the routed experts of one MoE layer on remote peers, called with the model's own routing."""

from __future__ import annotations

import collections
import dataclasses
import time

import torch
from torch import nn

from router_client import background
from router_client.autograd import DUMMY, new_forward_id
from router_client.catalog import CatalogView, ExpertCatalog, load_trusted_peers
from router_client.config import RouterConfig
from router_client.dispatch import (
    ExpertJob,
    JobResult,
    add_input_grads,
    gather_answers,
    rows_by_job,
    served_counts,
)
from router_client.moe import RemoteExpertError
from router_client.swarm_client import get_context, get_directory, make_dispatcher


class RemoteExperts(nn.Module):
    """The experts `PREFIX.LAYER.0` … `PREFIX.LAYER.(E−1)` of one MoE layer, hosted by peers of a dmoe swarm.

    A drop-in for the `experts` module of a Hugging Face MoE block: `forward(hidden_states [T, H], top_k_index
    [T, k], top_k_weights [T, k])` returns `Σ_j top_k_weights[t, j] · expert_{top_k_index[t, j]}(hidden_states[t])`
    per token, `[T, H]`. The routing is the model's own (its router, its top-k and its weights); this layer only
    calls the chosen experts: all tokens bound for one expert in one request, all requests concurrently, one
    deadline for the call (lookup included), the fastest usable replica first and failover to the others within
    that deadline, failing replicas banned (`router_client.dispatch.Dispatcher`).

    A slot whose expert could not answer (every replica failed, or none is listed) contributes nothing; `k_min` is
    judged per token: a token with fewer than `min(k_min, k)` answers raises `RemoteExpertError` naming the experts
    and why, or, with `allow_zero_outputs`, keeps what it got. Experts are never swapped for others: a pretrained
    model's output would change. `stats` counts calls, expert requests, failures and `masked_tokens`.

    Training: gradients reach the routing weights locally and the experts remotely (a Backward to the replica
    that served, which steps the expert's optimizer on its peer); a failed backward leaves that expert's
    contribution constant and never raises. Inputs travel in `expert_dtype` (default: the inputs' own), which
    must be the hosted experts' dtype; outputs come back in the inputs' dtype.

    Parameters: `initial_peers` or `dht` as for `RemoteMixtureOfExperts`, or a shared `catalog` (an
    `ExpertCatalog` of grid `(layers, experts)` under `uid_prefix`, so that one DHT listing serves every layer of
    a model); the remaining keyword arguments are fields of `RouterConfig`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        uid_prefix: str,
        layer_index: int,
        *,
        initial_peers=None,
        dht=None,
        catalog: ExpertCatalog | None = None,
        expert_dtype: torch.dtype | None = None,
        config: RouterConfig | None = None,
        **router_options,
    ):
        super().__init__()
        self.hidden_size, self.num_experts, self.layer_index = hidden_size, num_experts, layer_index
        self.uid_prefix = uid_prefix.rstrip(".")
        self.expert_dtype = expert_dtype
        self.config = dataclasses.replace(config or RouterConfig(), **router_options)
        self.uids = [f"{self.uid_prefix}.{layer_index}.{e}" for e in range(num_experts)]
        context = get_context(self.config)
        self.scores = context.scores
        if catalog is None:
            directory = get_directory(initial_peers, dht, cache_ttl=self.config.cache_ttl)
            trusted = load_trusted_peers(self.config.trusted_peers) if self.config.trusted_peers else None
            catalog = ExpertCatalog(
                directory,
                self.uid_prefix,
                (layer_index + 1, num_experts),
                ttl=self.config.cache_ttl,
                trusted_peers=trusted,
                scores=context.scores,
            )
        self.catalog = catalog
        self.dispatcher = make_dispatcher(self.config, context)
        self.stats: collections.Counter = collections.Counter()
        self._last_failures: dict[str, str] = {}

    def extra_repr(self) -> str:
        """What `print(model)` shows for this layer."""
        return f"{self.uid_prefix}.{self.layer_index}.[0:{self.num_experts}], hidden {self.hidden_size}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The weighted sum of each token's chosen experts' outputs, computed by the peers."""
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden states [tokens, {self.hidden_size}], got {list(hidden_states.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"top_k_index {list(top_k_index.shape)} and top_k_weights {list(top_k_weights.shape)} must both be "
                f"[tokens={hidden_states.shape[0]}, k]"
            )
        config = self.config
        self.stats["calls"] += 1
        num_tokens, k = top_k_index.shape
        if num_tokens == 0:
            return torch.zeros_like(hidden_states)
        deadline = time.monotonic() + config.forward_timeout
        if self.catalog.is_fresh():
            view = self.catalog.view
        else:  # a hop to the router's loop only when a refresh is due
            view = background.run(self.catalog.snapshot(deadline), timeout=config.forward_timeout + 1)
        jobs = _make_jobs(top_k_index, self.uids)
        required = min(config.k_min, k)
        forward_id = new_forward_id(torch.is_grad_enabled())
        outputs, answered = _RemoteExpertsCall.apply(DUMMY, hidden_states, self, jobs, k, view, deadline, forward_id)

        num_answered = answered.sum(dim=1)
        self.stats["masked_tokens"] += int((num_answered < k).sum())
        if bool((num_answered < required).any()):
            short = int((num_answered < required).sum())
            if not config.allow_zero_outputs:
                raise RemoteExpertError(self._failure_message(short, required))
            self.stats["zero_tokens"] += int((num_answered == 0).sum())
        weights = (top_k_weights * answered).to(outputs.dtype)
        return (weights.unsqueeze(-1) * outputs).sum(dim=1).to(hidden_states.dtype)

    def _failure_message(self, num_tokens: int, required: int) -> str:
        failures = self._last_failures
        listed = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:8])
        more = f" (and {len(failures) - 8} more)" if len(failures) > 8 else ""
        return (
            f"{num_tokens} tokens of MoE layer {self.layer_index} got fewer than k_min={required} expert answers "
            f"within {self.config.forward_timeout} s. Failed experts: {listed or 'none (deadline passed)'}{more}. "
            "Check that peers host every expert (`dmoe status --prefix PREFIX`), or allow zero outputs "
            "(allow_zero_outputs=True, --allow-zero-outputs)."
        )


def _make_jobs(top_k_index: torch.Tensor, uids: list[str]) -> list[ExpertJob]:
    """One job per chosen expert, with the (token, slot) pairs routed to it."""
    flat = top_k_index.reshape(-1).to(torch.int64)
    if bool((flat < 0).any()) or bool((flat >= len(uids)).any()):
        raise ValueError(f"top_k_index holds experts outside 0 … {len(uids) - 1}")
    k = top_k_index.shape[1]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(uids)).tolist()
    jobs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            positions = order[start : start + count]
            jobs.append(ExpertJob(uids[expert], positions // k, positions % k))
            start += count
    return jobs


def _run(layer: RemoteExperts, jobs, make_inputs, view: CatalogView, *, backward, deadline, required, timeout, fid):
    coro = layer.dispatcher.run(
        jobs,
        make_inputs,
        view.replicas,
        backward=backward,
        deadline=deadline,
        required=required,
        grace=layer.config.timeout_after_k_min,
        expected_shapes=lambda job: [(len(job.token_index), layer.hidden_size)],
        forward_id=fid,
    )
    try:
        return background.run(coro, timeout=timeout + 2.0)
    except TimeoutError:  # the dispatcher keeps its own deadline; this is the last line of defence
        return [JobResult(error="timed out", job=job) for job in jobs]


class _RemoteExpertsCall(torch.autograd.Function):
    """Autograd bridge: the experts' forward over the network, and their backward (to the replicas that served).

    Returns the outputs `[tokens, k, hidden]` and whether each slot was answered (not differentiable).
    """

    @staticmethod
    def forward(ctx, _dummy, hidden_states, layer: RemoteExperts, jobs, k: int, view: CatalogView, deadline, fid):
        inputs = hidden_states.detach()
        wire = inputs.to(layer.expert_dtype) if layer.expert_dtype is not None else inputs
        num_tokens = len(hidden_states)
        required = torch.full((num_tokens,), min(layer.config.k_min, k), dtype=torch.int64)
        rows = rows_by_job(jobs, wire)
        results = _run(
            layer,
            jobs,
            lambda job: [rows[id(job)]],
            view,
            backward=False,
            deadline=deadline,
            required=required,
            timeout=layer.config.forward_timeout,
            fid=fid,
        )
        outputs, answered, failures = gather_answers(results, inputs, k, layer.hidden_size, layer.stats)
        layer._last_failures = failures
        ctx.layer, ctx.view, ctx.forward_id = layer, view, fid
        ctx.served = [result for result in results if result.ok]
        ctx.save_for_backward(wire)
        ctx.mark_non_differentiable(answered)
        return outputs, answered

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered):
        (wire,) = ctx.saved_tensors
        layer: RemoteExperts = ctx.layer
        config = layer.config
        grad_inputs = torch.zeros(wire.shape, dtype=grad_outputs.dtype)
        if not ctx.served:
            return None, grad_inputs, None, None, None, None, None, None
        jobs = [dataclasses.replace(result.job, preferred=result.replica.endpoint) for result in ctx.served]
        served_per_token = served_counts(jobs, wire.shape[0])
        grads = grad_outputs.contiguous().to(wire.dtype)
        input_rows, grad_rows = rows_by_job(jobs, wire), rows_by_job(jobs, grads, by_slot=True)
        results = _run(
            layer,
            jobs,
            lambda job: [input_rows[id(job)], grad_rows[id(job)]],
            ctx.view,
            backward=True,
            deadline=time.monotonic() + config.backward_timeout,
            required=served_per_token.clamp(max=config.backward_k_min),
            timeout=config.backward_timeout,
            fid=ctx.forward_id,
        )
        layer.stats["backward_requests"] += len(jobs)
        add_input_grads(results, grad_inputs, layer.stats)
        return None, grad_inputs, None, None, None, None, None, None


def remote_expert_layers(
    hidden_size: int,
    num_experts: int,
    uid_prefix: str,
    layers: list[int] | tuple[int, ...],
    *,
    num_layers: int | None = None,
    initial_peers=None,
    dht=None,
    expert_dtype: torch.dtype | None = None,
    config: RouterConfig | None = None,
    **router_options,
) -> dict[int, RemoteExperts]:
    """A `RemoteExperts` for each of `layers` (experts `PREFIX.L.E`), sharing one cached listing of the grid
    `(num_layers, num_experts)` under `uid_prefix`: one DHT listing, refreshed in the background, serves them all."""
    config = dataclasses.replace(config or RouterConfig(), **router_options)
    num_layers = num_layers if num_layers is not None else max(layers, default=-1) + 1
    context = get_context(config)
    catalog = ExpertCatalog(
        get_directory(initial_peers, dht, cache_ttl=config.cache_ttl),
        uid_prefix.rstrip("."),
        (num_layers, num_experts),
        ttl=config.cache_ttl,
        trusted_peers=load_trusted_peers(config.trusted_peers) if config.trusted_peers else None,
        scores=context.scores,
    )
    return {
        layer: RemoteExperts(
            hidden_size, num_experts, uid_prefix, layer, catalog=catalog, expert_dtype=expert_dtype, config=config
        )
        for layer in layers
    }
