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
        answered = torch.zeros_like(required)
        tasks: dict[asyncio.Future, int] = {}

        def start(index: int) -> asyncio.Future:
            job = jobs[index]
            task = asyncio.ensure_future(
                self._serve(
                    job,
                    make_inputs(job),
                    replicas.get(job.uid, []),
                    backward=backward,
                    deadline=deadline,
                    expected=expected_shapes(job),
                    preferred=job.preferred or preferred.get(job.uid),
                    forward_id=forward_id if job.forward_id is None else job.forward_id,
                )
            )
            tasks[task] = index
            return task

        pending = {start(index) for index in range(len(jobs))}
        quorum_at: float | None = None
        try:
            while pending:
                now = time.monotonic()
                until = deadline if quorum_at is None else min(deadline, quorum_at + grace)
                if now >= until:
                    break
                done, pending = await asyncio.wait(pending, timeout=until - now, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = tasks[task]
                    result = results[index] = task.result()
                    result.job = jobs[index]
                    if result.ok:
                        answered[jobs[index].token_index] += 1
                    elif reroute is not None and time.monotonic() < until:
                        for job in reroute(jobs[index], result):
                            jobs.append(job)
                            results.append(JobResult(error="not finished before the deadline", job=job))
                            pending.add(start(len(jobs) - 1))
                # the quorum matters only while something is pending and the grace would end the call early
                if quorum_at is None and pending and time.monotonic() + grace < deadline:
                    if bool((answered >= required).all()):
                        quorum_at = time.monotonic()
        finally:
            for task in pending:
                task.cancel()
        return results

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
    ) -> JobResult:
        if not replicas:
            return JobResult(error="no live replica in the DHT")
        ordered = self.scores.order(replicas, preferred)
        if not self.hedge or len(ordered) == 1:
            return await self._serve_in_turn(job, inputs, ordered, backward, deadline, expected, forward_id, replicas)
        attempts: dict[asyncio.Task, tuple[ExpertReplica, float]] = {}
        errors: list[str] = []
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
        self, job: ExpertJob, inputs, ordered: list[ExpertReplica], backward, deadline, expected, forward_id, replicas
    ) -> JobResult:
        """Without hedging: one replica after the other, each call awaited right here (no task per attempt)."""
        errors: list[str] = []
        for replica in ordered:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            started = time.monotonic()
            try:
                outputs = await self.transport.call(
                    replica.endpoint, job.uid, inputs, backward=backward, timeout=timeout, forward_id=forward_id
                )
                self._check(outputs, expected, replica, job.uid, backward=backward)
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
        if not self.check_outputs:
            return
        shapes = [tuple(t.shape) for t in outputs]
        if expected and shapes != [tuple(s) for s in expected]:
            raise AnomalousAnswerError(f"answer of {uid} has shapes {shapes}, expected {expected}")
        first = outputs[0] if outputs else None
        screened = not backward and first is not None and first.is_floating_point() and first.dim() > 1
        for tensor in outputs[1:] if screened else outputs:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AnomalousAnswerError(f"answer of {uid} contains NaN or Inf")
        if not screened or first.numel() == 0:
            return
        norm = float(first.float().flatten(1).norm(dim=1).mean())  # NaN/Inf anywhere makes it non-finite
        if not math.isfinite(norm):
            raise AnomalousAnswerError(f"answer of {uid} contains NaN or Inf")
        seen, mean = self._mean_norms.get(uid, (0, 0.0))
        if seen >= 8 and norm > self.outlier_norm_factor * max(mean, 1e-6):
            raise AnomalousAnswerError(
                f"answer of {uid} has norm {norm:.3g}, {norm / max(mean, 1e-6):.0f}x its running mean {mean:.3g}"
            )
        seen += 1
        self._mean_norms[uid] = (seen, mean + (norm - mean) / min(seen, 100))
