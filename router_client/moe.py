"""`RemoteMixtureOfExperts`: a PyTorch layer whose experts live on remote peers."""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import time

import torch
from torch import nn

from router_client import background
from router_client.catalog import ExpertCatalog, load_trusted_peers
from router_client.config import RouterConfig
from router_client.dispatch import Dispatcher, ExpertJob, JobResult
from router_client.swarm_client import get_context, get_directory
from router_client.verification import Verifier

logger = logging.getLogger(__name__)

# An input of the autograd bridges that always requires grad: the experts get their Backward (and train) even
# when the layer's own input does not require grad (hivemind's `_dummy`, for the same reason).
_DUMMY = torch.empty(0, requires_grad=True)


def new_forward_id(training: bool) -> int:
    """A random nonzero id for a Forward whose Backward will follow (`training`), else 0."""
    return secrets.randbits(63) + 1 if training else 0


class RemoteExpertError(RuntimeError):
    """Remote experts could not serve a call; the message names the experts and why each failed."""


class RemoteMixtureOfExperts(nn.Module):
    """A Mixture-of-Experts layer whose experts are hosted by peers of a dmoe swarm.

    Input `[..., in_features]`, output the same shape. A local gate scores each dimension of the expert
    grid (`grid_size`, e.g. `(16,)` for `ffn.0` … `ffn.15`, or `(8, 8)` for `ffn.i.j`); each token goes to
    the `k_best` live experts with the highest summed scores, found in a cached view of the DHT that is
    refreshed in the background. All tokens bound for one expert travel in one request; the requests run
    concurrently with one deadline for the whole call (lookup included). Outputs are combined with the
    softmax of the gate scores over the experts that answered (with `k_best=1`, Switch-style: the output
    is scaled by the gate probability). `k_min` is judged per token: a token with fewer answers than
    `min(k_min, k_best)` raises `RemoteExpertError`, or, with `allow_zero_outputs`, keeps what it got
    (zeros when nothing answered).

    Training: the backward goes to the replica that served the forward (then to another), with its own
    timeout; a failed backward leaves that expert's contribution as a constant and never raises. After each
    training forward, `aux_loss` holds a Switch-style load-balancing loss (add it to your loss, scaled).
    `stats` counts calls, expert requests, failures and masked tokens.

    Parameters: `initial_peers` (multiaddrs of the swarm's DHT) or `dht` (a `dht.DHTNode` or
    `dht.ExpertDirectory`); the remaining keyword arguments are fields of `RouterConfig`.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: tuple[int, ...] | list[int] | int,
        uid_prefix: str,
        k_best: int,
        *,
        initial_peers=None,
        dht=None,
        config: RouterConfig | None = None,
        **router_options,
    ):
        super().__init__()
        self.in_features = in_features
        self.grid_size = (grid_size,) if isinstance(grid_size, int) else tuple(grid_size)
        self.uid_prefix = uid_prefix.rstrip(".")
        self.k_best = k_best
        self.config = dataclasses.replace(config or RouterConfig(), **router_options)
        self.gate = nn.Linear(in_features, sum(self.grid_size))
        directory = get_directory(initial_peers, dht, cache_ttl=self.config.cache_ttl)
        trusted = load_trusted_peers(self.config.trusted_peers) if self.config.trusted_peers else None
        self.catalog = ExpertCatalog(
            directory, self.uid_prefix, self.grid_size, ttl=self.config.cache_ttl, trusted_peers=trusted
        )
        context = get_context(self.config)
        self.scores = context.scores
        self.verifier = (
            Verifier(
                context.transport,
                context.scores,
                fraction=self.config.verify_fraction,
                tolerance=self.config.verify_tolerance,
                timeout=self.config.forward_timeout,
            )
            if self.config.verify_fraction > 0
            else None
        )
        self.dispatcher = Dispatcher(
            context.transport,
            context.scores,
            hedge=self.config.hedge,
            hedge_min_delay=self.config.hedge_min_delay,
            check_outputs=self.config.check_outputs,
            outlier_norm_factor=self.config.outlier_norm_factor,
            verifier=self.verifier,
        )
        self.stats: collections.Counter = collections.Counter()
        self.aux_loss: torch.Tensor | None = None
        self._last_failures: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route every token of `x` to its best experts and combine their answers."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {list(x.shape)}")
        config = self.config
        flat = x.reshape(-1, self.in_features)
        deadline = time.monotonic() + config.forward_timeout
        if self.catalog.is_fresh():
            catalog = self.catalog.view
        else:  # a hop to the router's loop only when a refresh is due
            catalog = background.run(self.catalog.snapshot(deadline), timeout=config.forward_timeout + 1)
        self.stats["calls"] += 1
        if not catalog.uids:
            if config.allow_zero_outputs:
                self.stats["zero_tokens"] += flat.shape[0]
                return torch.zeros_like(x)
            raise RemoteExpertError(f"no live experts under {self.uid_prefix!r} with grid {self.grid_size} in the DHT")

        logits = self.gate(flat).split(self.grid_size, dim=-1)
        coords = torch.from_numpy(catalog.coords)
        scores = sum(logits[d][:, coords[:, d]] for d in range(len(self.grid_size)))  # [tokens, live experts]
        k = min(self.k_best, len(catalog.uids))
        top_scores, top_index = scores.topk(k, dim=-1)
        jobs = _make_jobs(top_index, catalog.uids)
        forward_id = new_forward_id(torch.is_grad_enabled())
        outputs, answered = _RemoteMoECall.apply(_DUMMY, flat, self, jobs, catalog.replicas, deadline, k, forward_id)

        num_answered = answered.sum(dim=1)
        required = min(self.config.k_min, k)
        short = num_answered < required
        self.stats["expert_requests"] += len(jobs)
        self.stats["masked_tokens"] += int((num_answered < k).sum())
        if bool(short.any()):
            if not config.allow_zero_outputs:
                raise RemoteExpertError(self._failure_message(int(short.sum()), required))
            self.stats["zero_tokens"] += int((num_answered == 0).sum())

        if k == 1:  # Switch mode: the single expert's output is scaled by its gate probability
            weights = torch.softmax(scores, dim=-1).gather(1, top_index) * answered
        else:
            weights = torch.softmax(top_scores.masked_fill(~answered, -1e9), dim=-1)
            weights = weights * answered.any(dim=1, keepdim=True)
        if self.training:
            self.aux_loss = _switch_balance_loss(scores, top_index[:, 0])
        combined = (weights.unsqueeze(-1).to(outputs.dtype) * outputs).sum(dim=1)
        return combined.reshape(x.shape)

    def _failure_message(self, num_tokens: int, required: int) -> str:
        failures = self._last_failures
        listed = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:8])
        more = f" (and {len(failures) - 8} more)" if len(failures) > 8 else ""
        return (
            f"{num_tokens} tokens got fewer than k_min={required} expert answers within "
            f"{self.config.forward_timeout} s. Failed experts: {listed or 'none (deadline passed)'}{more}. "
            "Pass allow_zero_outputs=True to continue with zeros for such tokens."
        )


def _make_jobs(top_index: torch.Tensor, uids: list[str]) -> list[ExpertJob]:
    """One job per chosen expert, with the (token, slot) pairs routed to it."""
    flat_choice = top_index.reshape(-1)
    order = torch.argsort(flat_choice, stable=True)
    counts = torch.bincount(flat_choice, minlength=len(uids)).tolist()
    k = top_index.shape[1]
    jobs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            positions = order[start : start + count]
            jobs.append(ExpertJob(uids[expert], positions // k, positions % k))
            start += count
    return jobs


def _switch_balance_loss(scores: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss: E · Σ_e (fraction of tokens to e) · (mean gate prob of e)."""
    num_experts = scores.shape[1]
    fraction = torch.bincount(top1, minlength=num_experts).to(scores.dtype) / max(1, top1.numel())
    probability = torch.softmax(scores, dim=-1).mean(dim=0)
    return num_experts * (fraction * probability).sum()


class _RemoteMoECall(torch.autograd.Function):
    """Autograd bridge: forward and backward of all chosen experts, over the network."""

    @staticmethod
    def forward(
        ctx,
        _dummy: torch.Tensor,
        flat: torch.Tensor,
        layer: RemoteMixtureOfExperts,
        jobs: list[ExpertJob],
        replicas: dict,
        deadline: float,
        k: int,
        forward_id: int,
    ):
        config = layer.config
        inputs = flat.detach()
        num_tokens = inputs.shape[0]
        required = torch.full((num_tokens,), min(config.k_min, k), dtype=torch.int64)
        ctx.forward_id = forward_id
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [inputs[job.token_index]],
            replicas,
            backward=False,
            deadline=deadline,
            required=required,
            grace=config.timeout_after_k_min,
            timeout=config.forward_timeout,
            expected=lambda job: [(len(job.token_index), layer.in_features)],
            forward_id=ctx.forward_id,
        )
        outputs = inputs.new_zeros(num_tokens, k, layer.in_features)
        answered = torch.zeros(num_tokens, k, dtype=torch.bool)
        failures = {}
        for job, result in zip(jobs, results, strict=True):
            if result.ok:
                outputs[job.token_index, job.slot_index] = result.outputs[0].to(outputs.dtype)
                answered[job.token_index, job.slot_index] = True
            else:
                failures[job.uid] = result.error
                layer.stats["failed_requests"] += 1
        if failures:
            logger.debug("%d of %d expert requests failed: %s", len(failures), len(jobs), failures)
        layer._last_failures = failures
        ctx.layer, ctx.jobs, ctx.results, ctx.replicas = layer, jobs, results, replicas
        ctx.save_for_backward(inputs)
        ctx.mark_non_differentiable(answered)
        return outputs, answered

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered):
        (inputs,) = ctx.saved_tensors
        layer: RemoteMixtureOfExperts = ctx.layer
        config = layer.config
        served = [(job, result) for job, result in zip(ctx.jobs, ctx.results, strict=True) if result.ok]
        grad_inputs = torch.zeros_like(inputs)
        if not served:
            return None, grad_inputs, None, None, None, None, None, None
        jobs = [job for job, _ in served]
        preferred = {job.uid: result.replica.endpoint for job, result in served}
        served_per_token = torch.zeros(inputs.shape[0], dtype=torch.int64)
        for job in jobs:
            served_per_token[job.token_index] += 1
        required = served_per_token.clamp(max=config.backward_k_min)
        grad_outputs = grad_outputs.contiguous()
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [inputs[job.token_index], grad_outputs[job.token_index, job.slot_index]],
            ctx.replicas,
            backward=True,
            deadline=time.monotonic() + config.backward_timeout,
            required=required,
            grace=config.timeout_after_k_min,
            timeout=config.backward_timeout,
            expected=lambda job: [(len(job.token_index), layer.in_features)],
            preferred=preferred,
            forward_id=ctx.forward_id,
        )
        layer.stats["backward_requests"] += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            if result.ok:
                grad_inputs.index_add_(0, job.token_index, result.outputs[0].to(grad_inputs.dtype))
            else:
                layer.stats["backward_failures"] += 1
                logger.debug("backward of %s failed: %s", job.uid, result.error)
        return None, grad_inputs, None, None, None, None, None, None


def _run_jobs(
    layer,
    jobs,
    make_inputs,
    replicas,
    *,
    backward,
    deadline,
    required,
    grace,
    timeout,
    expected,
    preferred=None,
    forward_id: int = 0,
) -> list[JobResult]:
    coro = layer.dispatcher.run(
        jobs,
        make_inputs,
        replicas,
        backward=backward,
        deadline=deadline,
        required=required,
        grace=grace,
        expected_shapes=expected,
        preferred=preferred,
        forward_id=forward_id,
    )
    try:
        return background.run(coro, timeout=timeout + 2.0)
    except TimeoutError:  # the dispatcher keeps its own deadline; this is the last line of defence
        return [JobResult(error="timed out") for _ in jobs]
