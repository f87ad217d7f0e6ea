"""`RemoteMixtureOfExperts`: a PyTorch layer whose experts live on remote peers."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch
from torch import nn

from router_client import background
from router_client.autograd import DUMMY, new_forward_id
from router_client.catalog import CatalogView, ExpertCatalog, load_trusted_peers
from router_client.config import RouterConfig
from router_client.dispatch import Dispatcher, ExpertJob, JobResult
from router_client.replicas import PeerScores
from router_client.swarm_client import get_context, get_directory
from router_client.verification import Verifier

logger = logging.getLogger(__name__)

FALLBACK_CANDIDATES = 16
"""How many experts past its own k best a token may fall back to within one call."""


class RemoteExpertError(RuntimeError):
    """Remote experts could not serve a call; the message names the experts and why each failed."""


class RemoteMixtureOfExperts(nn.Module):
    """A Mixture-of-Experts layer whose experts are hosted by peers of a dmoe swarm.

    Input `[..., in_features]`, output the same shape. A local gate scores each dimension of the expert
    grid (`grid_size`, e.g. `(16,)` for `ffn.0` … `ffn.15`, or `(8, 8)` for `ffn.i.j`); each token goes to
    the `k_best` experts with the highest summed scores among those that can answer: listed in a cached view
    of the DHT (refreshed in the background) with at least one replica that is neither banned nor dead (a
    replica whose peer refused the connection stays dead until it announces a newer record). When no listed
    expert can answer, all of them are tried anyway. All tokens bound for one expert travel in one request;
    the requests run concurrently with one deadline for the whole call (lookup included). When every replica
    of an expert fails, its tokens fall back to their next-best usable expert (one they have not chosen, and
    that has not failed in this call), within the same deadline, as long as time and candidates remain.

    Outputs are combined with the softmax of the gate scores of the experts that served (with `k_best=1`,
    Switch-style: the output is scaled by the gate probability of the expert that served, over the experts
    that could answer). `k_min` is judged per token: a token with fewer answers than `min(k_min, k_best)`
    (or than the number of listed experts, if smaller; banned or dead ones count) raises `RemoteExpertError`,
    or, with `allow_zero_outputs`, keeps what it got (zeros when nothing answered).

    Training: the backward goes to the experts that served (fallbacks included), first to the replica that
    served the forward, with its own timeout; a failed backward leaves that expert's contribution as a
    constant and never raises. After each training forward, `aux_loss` holds a Switch-style load-balancing
    loss (add it to your loss, scaled). `stats` counts calls, expert requests, failures, `rerouted_tokens`
    (token slots served by a fallback expert) and `masked_tokens` (tokens left with fewer than k answers).

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
        context = get_context(self.config)
        self.scores = context.scores
        self.catalog = ExpertCatalog(
            directory,
            self.uid_prefix,
            self.grid_size,
            ttl=self.config.cache_ttl,
            trusted_peers=trusted,
            scores=context.scores,
        )
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
        scores = sum(logits[d][:, coords[:, d]] for d in range(len(self.grid_size)))  # [tokens, listed experts]
        usable = torch.from_numpy(catalog.usable(self.scores.unusable_endpoints()))
        try_anyway = not bool(usable.any())
        if try_anyway or bool(usable.all()):
            usable, gate_scores = torch.ones_like(usable), scores
        else:
            gate_scores = scores.masked_fill(~usable, float("-inf"))
        num_usable = int(usable.sum())
        k = min(self.k_best, num_usable)
        candidates = gate_scores.detach().topk(min(num_usable, k + FALLBACK_CANDIDATES), dim=-1).indices
        # judged against what is listed, not what is usable: experts that are banned or dead do not lower the bar
        required = min(config.k_min, self.k_best, len(catalog.uids))
        forward_id = new_forward_id(torch.is_grad_enabled())
        routing = _Routing(catalog, candidates, k, required, try_anyway, deadline, forward_id)
        jobs = _make_jobs(candidates[:, :k], catalog.uids)
        outputs, answered, final = _RemoteMoECall.apply(DUMMY, flat, self, jobs, routing)

        num_answered = answered.sum(dim=1)
        short = num_answered < required
        self.stats["masked_tokens"] += int((num_answered < k).sum())
        if bool(short.any()):
            if not config.allow_zero_outputs:
                raise RemoteExpertError(self._failure_message(int(short.sum()), required, catalog, usable))
            self.stats["zero_tokens"] += int((num_answered == 0).sum())

        if self.k_best == 1:  # Switch mode: the single expert's output is scaled by its gate probability
            weights = torch.softmax(gate_scores, dim=-1).gather(1, final) * answered
        else:
            weights = torch.softmax(scores.gather(1, final).masked_fill(~answered, -1e9), dim=-1)
            weights = weights * answered.any(dim=1, keepdim=True)
        if self.training:
            self.aux_loss = _switch_balance_loss(gate_scores, final[:, 0])
        combined = (weights.unsqueeze(-1).to(outputs.dtype) * outputs).sum(dim=1)
        return combined.reshape(x.shape)

    def _failure_message(self, num_tokens: int, required: int, catalog: CatalogView, usable: torch.Tensor) -> str:
        failures = self._last_failures
        listed = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:8])
        more = f" (and {len(failures) - 8} more)" if len(failures) > 8 else ""
        left_out = ""
        if not bool(usable.all()):
            reasons = {**self.scores.banned(), **self.scores.dead()}
            endpoints = {r.endpoint for uid in catalog.uids for r in catalog.replicas[uid]} & set(reasons)
            why = "; ".join(f"{endpoint}: {reasons[endpoint]}" for endpoint in sorted(endpoints)[:8])
            left_out = f" {int((~usable).sum())} listed experts had no usable replica ({why})."
        return (
            f"{num_tokens} tokens got fewer than k_min={required} expert answers within "
            f"{self.config.forward_timeout} s. Failed experts: {listed or 'none (deadline passed)'}{more}.{left_out} "
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


@dataclasses.dataclass
class _Routing:
    """One call's routing: the listing it uses, and per token the rows of the experts it may use, best first
    (its k chosen ones, then its fallbacks)."""

    view: CatalogView
    candidates: torch.Tensor  # [tokens, k + fallbacks], rows of `view.uids`
    k: int
    required: int  # answers each token needs
    try_anyway: bool  # nothing listed could answer: every listed expert is a candidate
    deadline: float
    forward_id: int


class _Fallback:
    """Re-routes the tokens of an expert that failed inside a call to each token's next-best candidate.

    A candidate qualifies when it is not among the token's current experts (`final`, updated here), has not
    failed in this call, and still has a usable replica (unless the call is trying everything anyway).
    Runs on the router's loop, called by the dispatcher.
    """

    def __init__(self, routing: _Routing, scores: PeerScores, final: torch.Tensor):
        self.routing, self.scores, self.final = routing, scores, final
        self.rows = {uid: row for row, uid in enumerate(routing.view.uids)}
        self.failed = torch.zeros(len(routing.view.uids), dtype=torch.bool)

    def __call__(self, job: ExpertJob, _result: JobResult) -> list[ExpertJob]:
        """The jobs that take over the tokens of `job`, whose every replica failed."""
        routing = self.routing
        self.failed[self.rows[job.uid]] = True
        if routing.try_anyway:
            usable = torch.ones_like(self.failed)
        else:
            usable = torch.from_numpy(routing.view.usable(self.scores.unusable_endpoints()))
        tokens, slots = job.token_index, job.slot_index
        candidates = routing.candidates[tokens]
        taken = (candidates.unsqueeze(-1) == self.final[tokens].unsqueeze(1)).any(dim=-1)
        free = ~taken & ~self.failed[candidates] & usable[candidates]
        found = free.any(dim=1)
        first_free = free.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
        pick = candidates.gather(1, first_free).squeeze(1)
        tokens, slots, pick = tokens[found], slots[found], pick[found]
        self.final[tokens, slots] = pick
        jobs = []
        for row in pick.unique().tolist():
            chosen = pick == row
            jobs.append(
                ExpertJob(
                    routing.view.uids[row],
                    tokens[chosen],
                    slots[chosen],
                    rerouted=True,
                    forward_id=new_forward_id(routing.forward_id != 0),
                )
            )
        return jobs


class _RemoteMoECall(torch.autograd.Function):
    """Autograd bridge: forward (with fallbacks) and backward of all serving experts, over the network.

    Returns the outputs `[tokens, k, hidden]`, whether each slot was answered, and the row of the expert that
    served (or last failed) each slot; the last two are not differentiable.
    """

    @staticmethod
    def forward(ctx, _dummy: torch.Tensor, flat: torch.Tensor, layer: RemoteMixtureOfExperts, jobs, routing):
        config = layer.config
        inputs = flat.detach()
        num_tokens, k = inputs.shape[0], routing.k
        final = routing.candidates[:, :k].clone()
        required = torch.full((num_tokens,), routing.required, dtype=torch.int64)
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [inputs[job.token_index]],
            routing.view.replicas,
            backward=False,
            deadline=routing.deadline,
            required=required,
            grace=config.timeout_after_k_min,
            timeout=config.forward_timeout,
            expected=lambda job: [(len(job.token_index), layer.in_features)],
            forward_id=routing.forward_id,
            reroute=_Fallback(routing, layer.scores, final),
        )
        final = final.clone()  # the router's loop is done with it
        outputs = inputs.new_zeros(num_tokens, k, layer.in_features)
        answered = torch.zeros(num_tokens, k, dtype=torch.bool)
        failures = {}
        for result in results:
            job = result.job
            if result.ok:
                outputs[job.token_index, job.slot_index] = result.outputs[0].to(outputs.dtype)
                answered[job.token_index, job.slot_index] = True
                if job.rerouted:
                    layer.stats["rerouted_tokens"] += len(job.token_index)
            else:
                failures[job.uid] = result.error
                layer.stats["failed_requests"] += 1
        layer.stats["expert_requests"] += len(results)
        if failures:
            logger.debug("%d of %d expert requests failed: %s", len(failures), len(results), failures)
        layer._last_failures = failures
        ctx.layer, ctx.routing = layer, routing
        ctx.served = [result for result in results if result.ok]
        ctx.save_for_backward(inputs)
        ctx.mark_non_differentiable(answered, final)
        return outputs, answered, final

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered, _grad_final):
        (inputs,) = ctx.saved_tensors
        layer: RemoteMixtureOfExperts = ctx.layer
        config = layer.config
        grad_inputs = torch.zeros_like(inputs)
        if not ctx.served:
            return None, grad_inputs, None, None, None
        jobs = [dataclasses.replace(result.job, preferred=result.replica.endpoint) for result in ctx.served]
        served_per_token = torch.zeros(inputs.shape[0], dtype=torch.int64)
        for job in jobs:
            served_per_token[job.token_index] += 1
        required = served_per_token.clamp(max=config.backward_k_min)
        grad_outputs = grad_outputs.contiguous()
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [inputs[job.token_index], grad_outputs[job.token_index, job.slot_index]],
            ctx.routing.view.replicas,
            backward=True,
            deadline=time.monotonic() + config.backward_timeout,
            required=required,
            grace=config.timeout_after_k_min,
            timeout=config.backward_timeout,
            expected=lambda job: [(len(job.token_index), layer.in_features)],
            forward_id=ctx.routing.forward_id,
        )
        layer.stats["backward_requests"] += len(jobs)
        for result in results:
            if result.ok:
                grad_inputs.index_add_(0, result.job.token_index, result.outputs[0].to(grad_inputs.dtype))
            else:
                layer.stats["backward_failures"] += 1
                logger.debug("backward of %s failed: %s", result.job.uid, result.error)
        return None, grad_inputs, None, None, None


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
    forward_id: int = 0,
    reroute=None,
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
        forward_id=forward_id,
        reroute=reroute,
    )
    try:
        return background.run(coro, timeout=timeout + 2.0)
    except TimeoutError:  # the dispatcher keeps its own deadline; this is the last line of defence
        return [JobResult(error="timed out", job=job) for job in jobs]
