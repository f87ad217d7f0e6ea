"""Concurrent dispatch of one request per expert, with a deadline, failover, hedging, fallback to other experts
and per-token k_min."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from dht import ExpertReplica
from router_client.replicas import PeerScores
from router_client.transport import ExpertCallError, ExpertTransport
from router_client.verification import Verifier

logger = logging.getLogger(__name__)


@dataclass
class ExpertJob:
    """All tokens of one call that go to one expert: `token_index[i]` uses its slot `slot_index[i]`.

    `rerouted`: the job took over tokens of an expert that failed in the same call. `forward_id`, when set,
    is sent instead of the call's (two jobs for one expert in one call need their own, so that the peer keeps
    both forward graphs). `preferred`: the endpoint to try first (for a backward, the one that served).
    """

    uid: str
    token_index: torch.Tensor
    slot_index: torch.Tensor
    rerouted: bool = False
    forward_id: int | None = None
    preferred: str | None = None


@dataclass
class JobResult:
    """What came back for one job: outputs and the replica that served them, or why it failed."""

    outputs: list[torch.Tensor] | None = None
    replica: ExpertReplica | None = None
    error: str | None = None
    job: ExpertJob | None = None

    @property
    def ok(self) -> bool:
        """Whether the job has outputs."""
        return self.outputs is not None


Reroute = Callable[[ExpertJob, JobResult], list[ExpertJob]]
"""Given a job whose every replica failed, the jobs that take over its tokens (none: they stay unserved)."""

_REFUSALS = ("failed to connect", "connection refused", "shutting down")


class AnomalousAnswerError(Exception):
    """A peer answered with NaN/Inf or tensors of the wrong shape."""


def refuses_connections(exc: Exception) -> bool:
    """Whether a failed call shows a peer that is gone (UNAVAILABLE: nothing listens, or it is shutting down)."""
    if not isinstance(exc, ExpertCallError) or exc.code != grpc.StatusCode.UNAVAILABLE:
        return False
    reason = exc.reason.lower()
    return any(marker in reason for marker in _REFUSALS)


class Dispatcher:
    """Runs a set of expert jobs concurrently on the router's loop and returns what each produced.

    Each job goes to the best replica of its expert; on failure it moves to the next replica while the
    deadline allows, and (with `hedge`) a second replica gets a copy once the first is slower than its p95.
    Without hedging, the first attempts of all jobs whose best replica is at the same peer travel together
    (`ExpertTransport.call_many`: one ForwardMany/BackwardMany) and their answers are checked together.
    Every failing replica is banned in `scores`, or marked dead there when it refuses connections. When every
    replica of a job failed before the deadline, `reroute` (if given) may hand its tokens to other experts:
    those jobs start at once, under the same deadline. The call ends at the deadline, or `grace` seconds after
    every token has `required` answers, whichever comes first; unfinished jobs are cancelled.
    """

    def __init__(
        self,
        transport: ExpertTransport,
        scores: PeerScores,
        *,
        hedge: bool = False,
        hedge_min_delay: float = 0.02,
        check_outputs: bool = True,
        outlier_norm_factor: float = 20.0,
        verifier: Verifier | None = None,
    ):
        self.transport, self.scores = transport, scores
        self.hedge, self.hedge_min_delay, self.check_outputs = hedge, hedge_min_delay, check_outputs
        self.outlier_norm_factor = outlier_norm_factor
        self.verifier = verifier
        self._mean_norms: dict[str, tuple[int, float]] = {}  # uid -> (answers seen, running mean token norm)

    async def run(
        self,
        jobs: list[ExpertJob],
        make_inputs: Callable[[ExpertJob], list[torch.Tensor]],
        replicas: dict[str, list[ExpertReplica]],
        *,
        backward: bool,
        deadline: float,
        required: torch.Tensor,
        grace: float,
        expected_shapes: Callable[[ExpertJob], list[tuple[int, ...]]],
        preferred: dict[str, str] | None = None,
        forward_id: int = 0,
        reroute: Reroute | None = None,
    ) -> list[JobResult]:
        """Run `jobs`; `required[t]` answers are wanted for token t before the grace period starts.

        Returns one result per job, in order, followed by those of the jobs `reroute` added, in the order they
        were made; each result names its job. `forward_id` goes with every request (see `ExpertTransport.call`)
        unless the job has its own.
        """
        preferred = preferred or {}
        jobs = list(jobs)
        results = [JobResult(error="not finished before the deadline", job=job) for job in jobs]
        inputs: list[list[torch.Tensor] | None] = [None] * len(jobs)
        answered = torch.zeros_like(required)
        uncounted: list[int] = []  # jobs that answered, not yet counted in `answered`
        tasks: dict[asyncio.Future, list[int]] = {}

        def inputs_of(index: int) -> list[torch.Tensor]:
            if inputs[index] is None:
                inputs[index] = make_inputs(jobs[index])
            return inputs[index]

        def forward_id_of(job: ExpertJob) -> int:
            return forward_id if job.forward_id is None else job.forward_id

        def start(index: int, retry: _Retry | None = None) -> asyncio.Future:
            job = jobs[index]
            task = asyncio.ensure_future(
                self._serve(
                    job,
                    inputs_of(index),
                    replicas.get(job.uid, []),
                    backward=backward,
                    deadline=deadline,
                    expected=expected_shapes(job),
                    preferred=job.preferred or preferred.get(job.uid),
                    forward_id=forward_id_of(job),
                    retry=retry,
                )
            )
            tasks[task] = [index]
            return task

        def start_grouped(indices: list[int]) -> set[asyncio.Future]:
            """First attempts of these jobs, one task per peer: each job's best replica, its peer's jobs together."""
            started, groups = set(), {}
            for index in indices:
                job = jobs[index]
                ordered = self.scores.order(replicas.get(job.uid, []), job.preferred or preferred.get(job.uid))
                if ordered:
                    groups.setdefault(ordered[0].endpoint, []).append((index, ordered[0]))
                else:
                    started.add(start(index))  # answers at once why nothing can serve it
            for endpoint, members in groups.items():
                picked = [index for index, _ in members]
                task = asyncio.ensure_future(
                    self._serve_group(
                        endpoint,
                        [jobs[i] for i in picked],
                        [inputs_of(i) for i in picked],
                        [replica for _, replica in members],
                        [replicas.get(jobs[i].uid, []) for i in picked],
                        backward=backward,
                        deadline=deadline,
                        expected=[expected_shapes(jobs[i]) for i in picked],
                        forward_ids=[forward_id_of(jobs[i]) for i in picked],
                    )
                )
                tasks[task] = picked
                started.add(task)
            return started

        if self.hedge:
            pending = {start(index) for index in range(len(jobs))}
        else:
            pending = start_grouped(list(range(len(jobs))))
        quorum_at: float | None = None
        try:
            while pending:
                now = time.monotonic()
                until = deadline if quorum_at is None else min(deadline, quorum_at + grace)
                if now >= until:
                    break
                done, pending = await asyncio.wait(pending, timeout=until - now, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    for index, outcome in zip(tasks.pop(task), task.result(), strict=True):
                        if isinstance(outcome, _Retry):  # failed at its best replica: on to the others
                            if time.monotonic() < deadline:
                                pending.add(start(index, outcome))
                                continue
                            outcome = JobResult(error="; ".join(outcome.errors))
                        result = results[index] = outcome
                        result.job = jobs[index]
                        if result.ok:
                            uncounted.append(index)
                        elif reroute is not None and time.monotonic() < until:
                            added = reroute(jobs[index], result)
                            jobs.extend(added)
                            inputs.extend([None] * len(added))
                            results.extend(
                                JobResult(error="not finished before the deadline", job=job) for job in added
                            )
                            first = len(jobs) - len(added)
                            pending |= {start(i) for i in range(first, len(jobs))}
                # the quorum matters only while something is pending and the grace would end the call early
                if quorum_at is None and pending and time.monotonic() + grace < deadline:
                    for index in uncounted:
                        answered[jobs[index].token_index] += 1
                    uncounted.clear()
                    if bool((answered >= required).all()):
                        quorum_at = time.monotonic()
        finally:
            for task in pending:
                task.cancel()
        return results

    async def _serve_group(
        self,
        endpoint: str,
        jobs: list[ExpertJob],
        inputs: list[list[torch.Tensor]],
        chosen: list[ExpertReplica],
        replicas: list[list[ExpertReplica]],
        *,
        backward: bool,
        deadline: float,
        expected: list[list[tuple[int, ...]]],
        forward_ids: list[int],
    ) -> list[JobResult | _Retry]:
        """The first attempt of several jobs whose best replica (`chosen`) is at `endpoint`, sent together
        (`ExpertTransport.call_many`) and checked together: per job its result, or `_Retry` when it failed."""
        started = time.monotonic()
        requests = [(job.uid, tensors, fid) for job, tensors, fid in zip(jobs, inputs, forward_ids, strict=True)]
        try:
            answers = await self.transport.call_many(endpoint, requests, backward=backward, timeout=deadline - started)
        except asyncio.CancelledError:
            self._note_silence(chosen[0], started)
            raise
        problems = self._check_many(answers, expected, [job.uid for job in jobs], backward=backward)
        failures = [a if isinstance(a, Exception) else p for a, p in zip(answers, problems, strict=True)]
        if any(failure is None for failure in failures):  # one round trip, one latency sample; failures then stand
            self.scores.record_success(endpoint, time.monotonic() - started)
        outcomes: list[JobResult | _Retry] = []
        for job, tensors, answer, failure, replica, job_replicas in zip(
            jobs, inputs, answers, failures, chosen, replicas, strict=True
        ):
            if failure is not None:
                errors: list[str] = []
                self._record_failure(replica, failure, errors)
                outcomes.append(_Retry({replica.endpoint}, errors))
                continue
            if self.verifier is not None and not backward:
                self.verifier.maybe_verify(job.uid, tensors, answer, replica, job_replicas)
            outcomes.append(JobResult(outputs=answer, replica=replica))
        return outcomes

    async def _serve(
        self,
        job: ExpertJob,
        inputs,
        replicas: list[ExpertReplica],
        *,
        backward: bool,
        deadline: float,
        expected: list[tuple[int, ...]],
        preferred: str | None,
        forward_id: int = 0,
        retry: _Retry | None = None,
    ) -> list[JobResult]:
        """The job's result, as a list of one (as `_serve_group` answers); `retry`: the replicas tried already."""
        return [
            await self._serve_one(job, inputs, replicas, backward, deadline, expected, preferred, forward_id, retry)
        ]

    async def _serve_one(
        self, job: ExpertJob, inputs, replicas, backward, deadline, expected, preferred, forward_id, retry
    ) -> JobResult:
        if not replicas:
            return JobResult(error="no live replica in the DHT")
        ordered = self.scores.order(replicas, preferred)
        errors: list[str] = []
        if retry is not None:
            ordered = [replica for replica in ordered if replica.endpoint not in retry.tried]
            errors = list(retry.errors)
        if not self.hedge or len(ordered) <= 1:
            return await self._serve_in_turn(
                job, inputs, ordered, backward, deadline, expected, forward_id, replicas, errors
            )
        attempts: dict[asyncio.Task, tuple[ExpertReplica, float]] = {}
        next_replica = 0
        hedged = False

        def launch() -> None:
            nonlocal next_replica
            replica = ordered[next_replica]
            next_replica += 1
            timeout = deadline - time.monotonic()
            coro = self.transport.call(
                replica.endpoint, job.uid, inputs, backward=backward, timeout=timeout, forward_id=forward_id
            )
            attempts[asyncio.ensure_future(coro)] = (replica, time.monotonic())

        launch()
        try:
            while attempts:
                now = time.monotonic()
                wait = deadline - now
                if self.hedge and not hedged and next_replica < len(ordered):
                    first_replica, started = next(iter(attempts.values()))
                    delay = self.scores.hedge_delay(first_replica.endpoint)
                    if delay is not None:
                        wait = min(wait, max(delay, self.hedge_min_delay) - (now - started))
                if wait <= 0 and now >= deadline:
                    break
                done, _ = await asyncio.wait(list(attempts), timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if time.monotonic() >= deadline:
                        break
                    if self.hedge and not hedged and next_replica < len(ordered):
                        hedged = True
                        launch()
                    continue
                for task in done:
                    replica, started = attempts.pop(task)
                    try:
                        outputs = task.result()
                    except Exception as exc:  # a failed call, or anything unexpected
                        self._record_failure(replica, exc, errors)
                        continue
                    result = self._accept(job, inputs, outputs, replica, started, expected, backward, replicas, errors)
                    if result is not None:
                        return result
                if not attempts and next_replica < len(ordered) and time.monotonic() < deadline:
                    launch()  # failover inside the same deadline
        finally:
            for task, (replica, started) in attempts.items():
                task.cancel()
                self._note_silence(replica, started)
        if not errors:
            errors.append("deadline passed")
        return JobResult(error="; ".join(errors))

    async def _serve_in_turn(
        self,
        job: ExpertJob,
        inputs,
        ordered: list[ExpertReplica],
        backward,
        deadline,
        expected,
        forward_id,
        replicas,
        errors: list[str],
    ) -> JobResult:
        """Without hedging: one replica after the other, each call awaited right here (no task per attempt)."""
        for replica in ordered:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            started = time.monotonic()
            try:
                outputs = await self.transport.call(
                    replica.endpoint, job.uid, inputs, backward=backward, timeout=timeout, forward_id=forward_id
                )
            except asyncio.CancelledError:
                self._note_silence(replica, started)
                raise
            except Exception as exc:  # a failed call, or anything unexpected
                self._record_failure(replica, exc, errors)
                continue
            result = self._accept(job, inputs, outputs, replica, started, expected, backward, replicas, errors)
            if result is not None:
                return result
        return JobResult(error="; ".join(errors) or "deadline passed")

    def _accept(
        self, job, inputs, outputs, replica: ExpertReplica, started: float, expected, backward, replicas, errors
    ) -> JobResult | None:
        """The job's result when `outputs` pass the checks; else None, with the failure recorded."""
        try:
            self._check(outputs, expected, replica, job.uid, backward=backward)
        except Exception as exc:  # a bad answer
            self._record_failure(replica, exc, errors)
            return None
        self.scores.record_success(replica.endpoint, time.monotonic() - started)
        if self.verifier is not None and not backward:
            self.verifier.maybe_verify(job.uid, inputs, outputs, replica, replicas)
        return JobResult(outputs=outputs, replica=replica)

    def _record_failure(self, replica: ExpertReplica, exc: Exception, errors: list[str]) -> None:
        reason = exc.reason if isinstance(exc, ExpertCallError) else str(exc) or repr(exc)
        errors.append(f"{replica.endpoint}: {reason}")
        if refuses_connections(exc):
            self.scores.mark_dead(replica, reason)
        else:
            self.scores.record_failure(replica.endpoint, reason)

    def _note_silence(self, replica: ExpertReplica, started: float) -> None:
        """Ban a replica whose call was cancelled while silent for much longer than usual (e.g. a cut link that
        drops packets): its good record would otherwise keep it first in line, and every call would wait for it."""
        waited = time.monotonic() - started
        usual = self.scores.typical_latency(replica.endpoint) or 0.0
        if waited >= max(4 * usual, 0.25):
            self.scores.record_failure(replica.endpoint, f"no answer after {waited:.2f} s")

    def _check(
        self, outputs: list[torch.Tensor], expected: list[tuple[int, ...]], replica, uid: str, *, backward: bool
    ) -> None:
        (problem,) = self._check_many([outputs], [expected], [uid], backward=backward)
        if problem is not None:
            raise problem

    def _check_many(
        self, answers: list, expected: list[list[tuple[int, ...]]], uids: list[str], *, backward: bool
    ) -> list[AnomalousAnswerError | None]:
        """Per answer (a failed call's error is passed over) what is wrong with it: shapes other than `expected`,
        NaN/Inf, or (for a Forward) a mean token norm far above the expert's running mean. The norms of all the
        answers are computed together."""
        problems: list[AnomalousAnswerError | None] = [None] * len(answers)
        if not self.check_outputs:
            return problems
        screened: list[int] = []  # answers whose first output is screened through its norm
        checked: list[tuple[int, torch.Tensor]] = []  # the other floating outputs, checked for NaN/Inf together
        for index, outputs in enumerate(answers):
            if isinstance(outputs, Exception):
                continue
            uid = uids[index]
            shapes = [tuple(t.shape) for t in outputs]
            if expected[index] and shapes != [tuple(s) for s in expected[index]]:
                problems[index] = AnomalousAnswerError(
                    f"answer of {uid} has shapes {shapes}, expected {expected[index]}"
                )
                continue
            first = outputs[0] if outputs else None
            screened_here = not backward and first is not None and first.is_floating_point() and first.dim() > 1
            checked += [(index, t) for t in (outputs[1:] if screened_here else outputs) if t.is_floating_point()]
            if screened_here and first.numel():
                screened.append(index)
        for index in _non_finite(checked):
            problems[index] = AnomalousAnswerError(f"answer of {uids[index]} contains NaN or Inf")
        screened = [index for index in screened if problems[index] is None]
        norms = _mean_token_norms([answers[index][0] for index in screened])
        for index, norm in zip(screened, norms, strict=True):
            problems[index] = self._judge_norm(uids[index], norm)
        return problems

    def _judge_norm(self, uid: str, norm: float) -> AnomalousAnswerError | None:
        """Whether an answer's mean token norm is anomalous; a normal one updates the expert's running mean."""
        if not math.isfinite(norm):  # NaN/Inf anywhere in the answer makes its norm non-finite
            return AnomalousAnswerError(f"answer of {uid} contains NaN or Inf")
        seen, mean = self._mean_norms.get(uid, (0, 0.0))
        if seen >= 8 and norm > self.outlier_norm_factor * max(mean, 1e-6):
            return AnomalousAnswerError(
                f"answer of {uid} has norm {norm:.3g}, {norm / max(mean, 1e-6):.0f}x its running mean {mean:.3g}"
            )
        seen += 1
        self._mean_norms[uid] = (seen, mean + (norm - mean) / min(seen, 100))
        return None


def _non_finite(tensors: list[tuple[int, torch.Tensor]]) -> set[int]:
    """The indices of the tensors holding NaN/Inf: one check of them all, then one per tensor only if it fails."""
    if not tensors or bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in tensors])).all()):
        return set()
    return {index for index, tensor in tensors if not bool(torch.isfinite(tensor).all())}


@dataclass
class _Retry:
    """A job that failed at the replicas in `tried` (with these `errors`) and goes on to its other replicas."""

    tried: set[str]
    errors: list[str]


_JOINT_NORM_MAX_ELEMENTS = 1 << 20
"""Answers that hold at most this many elements together get their norms in one reduction (one copy of them)."""


def _mean_token_norms(outputs: list[torch.Tensor]) -> list[float]:
    """Per tensor ``[tokens, ...]``, the mean over its tokens of their L2 norm: small tensors of one trailing shape
    and dtype in one reduction, others one by one."""
    if not outputs:
        return []
    first = outputs[0]
    joint = (
        len(outputs) > 1
        and sum(t.numel() for t in outputs) <= _JOINT_NORM_MAX_ELEMENTS
        and all(t.shape[1:] == first.shape[1:] and t.dtype == first.dtype for t in outputs)
    )
    if joint:
        norms = torch.linalg.vector_norm(torch.cat(outputs).float().flatten(1), dim=1)
        joint = bool(torch.isfinite(norms).all())  # a NaN would run into the sums of the answers after it
    if not joint:
        return [float(torch.linalg.vector_norm(t.float().flatten(1), dim=1).mean()) for t in outputs]
    running = [0.0, *norms.double().cumsum(0).tolist()]  # running sums: one segment's sum is a difference
    means, start = [], 0
    for tensor in outputs:
        end = start + tensor.shape[0]
        means.append((running[end] - running[start]) / (end - start))
        start = end
    return means


def rows_by_job(jobs: list[ExpertJob], tensor: torch.Tensor, *, by_slot: bool = False) -> dict[int, torch.Tensor]:
    """Each job's rows of `tensor`, by ``id(job)``: ``tensor[job.token_index]``, or with `by_slot`
    ``tensor[job.token_index, job.slot_index]``, cut from one gather for all jobs rather than one per job."""
    if not jobs:
        return {}
    tokens = torch.cat([job.token_index for job in jobs])
    rows = tensor[tokens, torch.cat([job.slot_index for job in jobs])] if by_slot else tensor.index_select(0, tokens)
    return dict(zip(map(id, jobs), rows.split([len(job.token_index) for job in jobs]), strict=True))


def served_counts(jobs: list[ExpertJob], num_tokens: int) -> torch.Tensor:
    """How many of `jobs` each of `num_tokens` tokens is in (``[num_tokens]``, int64)."""
    if not jobs:
        return torch.zeros(num_tokens, dtype=torch.int64)
    return torch.bincount(torch.cat([job.token_index for job in jobs]), minlength=num_tokens)


def add_input_grads(results: list[JobResult], grad_inputs: torch.Tensor, stats) -> None:
    """Add each answered Backward's input gradients to their tokens' rows of `grad_inputs`, with one index_add
    for all of them; counts `backward_failures` in `stats` (a Counter) for the others."""
    answered = []
    for result in results:
        if result.ok:
            answered.append(result)
        else:
            stats["backward_failures"] += 1
            logger.debug("backward of %s failed: %s", result.job.uid, result.error)
    if answered:
        tokens = torch.cat([result.job.token_index for result in answered])
        grads = torch.cat([result.outputs[0].to(grad_inputs.dtype) for result in answered])
        grad_inputs.index_add_(0, tokens, grads)


def gather_answers(
    results: list[JobResult], like: torch.Tensor, k: int, width: int, stats
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Put every answered job's outputs in place: ``outputs [tokens, k, width]`` (dtype and device of `like`, zeros
    where nothing answered), ``answered [tokens, k]``, and uid -> why for the jobs that failed. Counts
    `expert_requests`, `failed_requests` and `rerouted_tokens` in `stats` (a Counter)."""
    outputs = like.new_zeros(like.shape[0], k, width)
    answered = torch.zeros(like.shape[0], k, dtype=torch.bool)
    failures: dict[str, str] = {}
    served = []
    for result in results:
        job = result.job
        if result.ok:
            served.append(result)
            if job.rerouted:
                stats["rerouted_tokens"] += len(job.token_index)
        else:
            failures[job.uid] = result.error
            stats["failed_requests"] += 1
    if served:  # one scatter for all of them: a call may have hundreds of jobs of a token or two
        tokens = torch.cat([result.job.token_index for result in served])
        slots = torch.cat([result.job.slot_index for result in served])
        outputs[tokens, slots] = torch.cat([result.outputs[0].to(outputs.dtype) for result in served])
        answered[tokens, slots] = True
    stats["expert_requests"] += len(results)
    if failures:
        logger.debug("%d of %d expert requests failed: %s", len(failures), len(results), failures)
    return outputs, answered, failures
