"""`RemoteMixtureOfExperts`: a PyTorch layer whose experts live on remote peers."""

from __future__ import annotations

import collections
import dataclasses
import time

import torch
from torch import nn

from router_client import background
from router_client.autograd import DUMMY, new_forward_id
from router_client.catalog import load_trusted_peers
from router_client.config import RouterConfig
from router_client.dispatch import (
    ExpertJob,
    JobResult,
    add_input_grads,
    gather_answers,
    rows_by_job,
    served_counts,
)
from router_client.grid_index import GridIndex
from router_client.metrics import register_router_metrics
from router_client.replicas import PeerScores
from router_client.swarm_client import get_context, get_directory, make_dispatcher

FALLBACK_CANDIDATES = 16
"""How many experts past its own k best a token may fall back to within one call."""


class RemoteExpertError(RuntimeError):
    """Remote experts could not serve a call; the message names the experts and why each failed."""


class RemoteMixtureOfExperts(nn.Module):
    """A Mixture-of-Experts layer whose experts are hosted by peers of a dmoe swarm.

    Input `[..., in_features]`, output the same shape. A local gate scores each dimension of the expert
    grid (`grid_size`, e.g. `(16,)` for `ffn.0` … `ffn.15`, or `(64, 64)` for `ffn.i.j`); each token goes to
    the `k_best` experts with the highest summed scores among those that can answer, found by a batched beam
    search over the grid's DHT prefix records (`GridIndex`: one DHT round trip per grid level for the whole
    batch when the records are not cached, none when they are; refreshed in the background; the grid is never
    listed). Experts that can answer have at least one replica that is neither banned nor dead (a replica
    whose peer refused the connection stays dead until it announces a newer record); when none can, all are
    tried anyway. The beam keeps `beam_size` prefixes per token and level (exact for 1-d grids and whenever
    that covers every live prefix). All tokens bound for one expert travel in one request; the requests run
    concurrently with one deadline for the whole call (lookup included). When every replica of an expert
    fails, its tokens fall back to their next-best usable expert found by the same search (one they have not
    chosen, and that has not failed in this call), within the same deadline, as long as time and candidates
    remain.

    Outputs are combined with the softmax of the gate scores of the experts that served (with `k_best=1`,
    Switch-style: the output is scaled by the gate probability of the expert that served, over the token's
    candidates). `k_min` is judged per token: a token with fewer answers than `min(k_min, k_best)`
    (or than the number of known experts, if smaller; banned or dead ones count) raises `RemoteExpertError`,
    or, with `allow_zero_outputs`, keeps what it got (zeros when nothing answered).

    Training: the backward goes to the experts that served (fallbacks included), first to the replica that
    served the forward, with its own timeout; a failed backward leaves that expert's contribution as a
    constant and never raises. After each training forward, `aux_loss` holds a Switch-style load-balancing
    loss per grid dimension (add it to your loss, scaled). `stats` counts calls, expert requests, failures,
    `rerouted_tokens` (token slots served by a fallback expert) and `masked_tokens` (tokens left with fewer
    than k answers); `index.lookups` counts the DHT reads that a forward waited for or ran in the background.

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
        self.index = GridIndex(
            directory,
            self.uid_prefix,
            self.grid_size,
            ttl=self.config.cache_ttl,
            trusted_peers=trusted,
            scores=context.scores,
        )
        self.beam_size = self.config.beam_size or self.k_best + 2
        self.dispatcher = make_dispatcher(self.config, context)
        self.verifier = self.dispatcher.verifier
        self.stats: collections.Counter = collections.Counter()
        self.aux_loss: torch.Tensor | None = None
        self._last_failures: dict[str, str] = {}
        register_router_metrics(self)  # its counters in prometheus-client's default registry (held by weakref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route every token of `x` to its best experts and combine their answers."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {list(x.shape)}")
        config = self.config
        flat = x.reshape(-1, self.in_features)
        deadline = time.monotonic() + config.forward_timeout
        self.stats["calls"] += 1
        logits = self.gate(flat).split(self.grid_size, dim=-1)
        routed = self.route(logits, deadline)
        if routed is None:
            if config.allow_zero_outputs:
                self.stats["zero_tokens"] += flat.shape[0]
                return torch.zeros_like(x)
            raise RemoteExpertError(f"no live experts under {self.uid_prefix!r} with grid {self.grid_size} in the DHT")
        routing, scores, jobs, unusable = routed
        k, required = routing.k, routing.required
        outputs, answered, final = _RemoteMoECall.apply(DUMMY, flat, self, jobs, routing)

        num_answered = answered.sum(dim=1)
        short = num_answered < required
        self.stats["masked_tokens"] += int((num_answered < k).sum())
        if bool(short.any()):
            if not config.allow_zero_outputs:
                raise RemoteExpertError(self._failure_message(int(short.sum()), required, unusable))
            self.stats["zero_tokens"] += int((num_answered == 0).sum())

        final_scores = self._grid_scores(logits, final)
        if self.k_best == 1:  # Switch mode: the single expert's output is scaled by its gate probability
            weights = torch.exp(final_scores - torch.logsumexp(scores, dim=-1, keepdim=True)) * answered
        else:
            weights = torch.softmax(final_scores.masked_fill(~answered, -1e9), dim=-1)
            weights = weights * answered.any(dim=1, keepdim=True)
        if self.training:
            self.aux_loss = _switch_balance_loss(logits, self.index.coordinates_of(final[:, 0]))
        combined = (weights.unsqueeze(-1).to(outputs.dtype) * outputs).sum(dim=1)
        return combined.reshape(x.shape)

    def route(self, logits: tuple[torch.Tensor, ...], deadline: float):
        """Each token's candidate experts (beam search over the grid index) and the jobs for its k best.

        Returns None when no expert is known, else ``(routing, scores, jobs, unusable)``: the call's `_Routing`,
        the gate scores of every candidate (``[tokens, candidates]``, -inf where none), the jobs of the chosen
        experts and the endpoints that were unusable. This is the whole routing cost of a forward.
        """
        config = self.config
        detached = [dim_logits.detach() for dim_logits in logits]
        unusable = frozenset(self.scores.unusable_endpoints())
        num_candidates = self.k_best + FALLBACK_CANDIDATES
        rows = self.index.search(detached, num_candidates, self.beam_size, unusable, deadline)
        try_anyway = False
        if unusable and not bool((rows[:, 0] >= 0).any()):  # nothing usable: try everything that is known
            rows = self.index.search(detached, num_candidates, self.beam_size, frozenset(), deadline)
            try_anyway = True
        valid = rows >= 0
        if not bool(valid.any()):
            return None
        rows = rows.clamp_(min=0)
        scores = self._grid_scores(logits, rows).masked_fill(~valid, float("-inf"))
        k = min(self.k_best, num_candidates)
        # judged against what is known, not what is usable: experts that are banned or dead do not lower the bar
        required = min(config.k_min, self.k_best, self.index.num_known)
        forward_id = new_forward_id(torch.is_grad_enabled())
        routing = _Routing(self.index, rows, valid, k, required, try_anyway, deadline, forward_id)
        return routing, scores, _make_jobs(rows[:, :k], valid[:, :k], self.index), unusable

    def _grid_scores(self, logits: tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
        """The gate score of the expert at each of `rows` (``[tokens, n]``): the sum of its dimensions' logits."""
        coords = self.index.coordinates_of(rows)
        return sum(dim_logits.gather(1, dim_coords) for dim_logits, dim_coords in zip(logits, coords, strict=True))

    def _failure_message(self, num_tokens: int, required: int, unusable: frozenset[str]) -> str:
        failures = self._last_failures
        listed = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:8])
        more = f" (and {len(failures) - 8} more)" if len(failures) > 8 else ""
        left_out = ""
        reasons = {**self.scores.banned(), **self.scores.dead()}
        endpoints = self.index.endpoints() & set(reasons)
        if endpoints:
            why = "; ".join(f"{endpoint}: {reasons[endpoint]}" for endpoint in sorted(endpoints)[:8])
            unserved = int((~self.index.usable(unusable)).sum())
            left_out = f" {unserved} known experts had no usable replica ({why})."
        return (
            f"{num_tokens} tokens got fewer than k_min={required} expert answers within "
            f"{self.config.forward_timeout} s. Failed experts: {listed or 'none (deadline passed)'}{more}.{left_out} "
            "Pass allow_zero_outputs=True to continue with zeros for such tokens."
        )


def _make_jobs(top_rows: torch.Tensor, valid: torch.Tensor, index: GridIndex) -> list[ExpertJob]:
    """One job per chosen expert, with the (token, slot) pairs routed to it (slots marked not `valid` get none)."""
    k = top_rows.shape[1]
    positions = valid.reshape(-1).nonzero().squeeze(1)
    choices = top_rows.reshape(-1)[positions]
    order = torch.argsort(choices, stable=True)
    experts, counts = torch.unique_consecutive(choices[order], return_counts=True)
    positions = positions[order]
    sizes = counts.tolist()
    tokens, slots = (positions // k).split(sizes), (positions % k).split(sizes)
    return [
        ExpertJob(index.uid(row), token_index, slot_index)
        for row, token_index, slot_index in zip(experts.tolist(), tokens, slots, strict=True)
    ]


def _switch_balance_loss(logits: tuple[torch.Tensor, ...], top1_coords: list[torch.Tensor]) -> torch.Tensor:
    """Switch Transformer load-balancing loss, per grid dimension and summed over them: for dimension d with size
    E_d, E_d · Σ_c (fraction of tokens whose first expert has coordinate c) · (mean softmax probability of c)."""
    loss = logits[0].new_zeros(())
    for dim_logits, coords in zip(logits, top1_coords, strict=True):
        size = dim_logits.shape[1]
        fraction = torch.bincount(coords, minlength=size).to(dim_logits.dtype) / max(1, coords.numel())
        loss = loss + size * (fraction * torch.softmax(dim_logits, dim=-1).mean(dim=0)).sum()
    return loss


@dataclasses.dataclass
class _Routing:
    """One call's routing: the grid index it uses, and per token the rows of the experts it may use, best first
    (its k chosen ones, then its fallbacks)."""

    view: GridIndex
    candidates: torch.Tensor  # [tokens, k + fallbacks], rows of the grid (0 where not valid)
    valid: torch.Tensor  # [tokens, k + fallbacks], whether the candidate exists
    k: int
    required: int  # answers each token needs
    try_anyway: bool  # nothing known could answer: every known expert is a candidate
    deadline: float
    forward_id: int


class _Fallback:
    """Re-routes the tokens of an expert that failed inside a call to each token's next-best candidate.

    A candidate qualifies when it exists, is not among the token's current experts (`final`, updated here), has
    not failed in this call, and still has a usable replica (unless the call is trying everything anyway).
    Runs on the router's loop, called by the dispatcher.
    """

    def __init__(self, routing: _Routing, scores: PeerScores, final: torch.Tensor):
        self.routing, self.scores, self.final = routing, scores, final
        self.failed: set[int] = set()

    def __call__(self, job: ExpertJob, _result: JobResult) -> list[ExpertJob]:
        """The jobs that take over the tokens of `job`, whose every replica failed."""
        routing = self.routing
        self.failed.add(routing.view.row(job.uid))
        tokens, slots = job.token_index, job.slot_index
        candidates = routing.candidates[tokens]
        taken = (candidates.unsqueeze(-1) == self.final[tokens].unsqueeze(1)).any(dim=-1)
        failed = torch.isin(candidates, torch.tensor(sorted(self.failed), dtype=candidates.dtype))
        free = ~taken & ~failed & routing.valid[tokens]
        if not routing.try_anyway:
            usable = torch.from_numpy(routing.view.usable(self.scores.unusable_endpoints()))
            free &= usable[candidates]
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
                    routing.view.uid(row),
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
        rows = rows_by_job(jobs, inputs)  # fallback jobs made during the call index their own
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [rows[id(job)] if id(job) in rows else inputs[job.token_index]],
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
        outputs, answered, failures = gather_answers(results, inputs, k, layer.in_features, layer.stats)
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
        served_per_token = served_counts(jobs, inputs.shape[0])
        required = served_per_token.clamp(max=config.backward_k_min)
        grad_outputs = grad_outputs.contiguous()
        input_rows, grad_rows = rows_by_job(jobs, inputs), rows_by_job(jobs, grad_outputs, by_slot=True)
        results = _run_jobs(
            layer,
            jobs,
            lambda job: [input_rows[id(job)], grad_rows[id(job)]],
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
        add_input_grads(results, grad_inputs, layer.stats)
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
