"""Per-expert batching: concurrent requests from many clients are merged into one compute batch."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from peer.compute import ComputeRunner
from peer.metrics import waiting_for_compute

logger = logging.getLogger(__name__)

ComputeFn = Callable[[list[torch.Tensor], int], list[torch.Tensor]]
"""Computes one batch: `(inputs, forward_id)`; `forward_id` is its request's when the batch holds one, else 0."""


class QueueFullError(Exception):
    """The expert's queue holds its maximum number of requests."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before its batch could be computed."""


@dataclass
class _Task:
    tensors: list[torch.Tensor]
    num_tokens: int
    deadline: float | None
    future: asyncio.Future = field(repr=False)
    forward_id: int = 0


@dataclass
class LoadStats:
    """How busy one queue has been: batches, tokens, expired requests and a smoothed tokens/s."""

    batches_processed: int = 0
    tokens_processed: int = 0
    requests_expired: int = 0
    largest_batch: int = 0
    tokens_per_second: float = 0.0
    _window_start: float = field(default_factory=time.monotonic, repr=False)
    _window_tokens: int = field(default=0, repr=False)

    def record_batch(self, num_tokens: int) -> None:
        """Count one computed batch; tokens/s is refreshed about once a second (exponential smoothing)."""
        self.batches_processed += 1
        self.tokens_processed += num_tokens
        self.largest_batch = max(self.largest_batch, num_tokens)
        self._window_tokens += num_tokens
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            rate = self._window_tokens / (now - self._window_start)
            self.tokens_per_second = rate if self.batches_processed == 1 else 0.5 * self.tokens_per_second + 0.5 * rate
            self._window_start, self._window_tokens = now, 0


class BatchingQueue:
    """Merges concurrent requests for one expert and one kind of pass into batches of at most
    `max_batch_size` tokens, and computes each batch with the peer's `ComputeRunner`, in one pass with the
    batches of other queues that are ready in the same event-loop tick (such as the experts of one
    ForwardMany); the time of this queue's last batch, when this one is no larger, is its expected duration.
    One batch of a queue is computed at a time: requests that arrive meanwhile wait, and form the next batch as
    soon as it is done. There is no task per queue: the request that finds the queue idle, or the end of the
    previous batch, has the next one formed (on the event loop, once the tick's other requests are queued).

    Requests are tensors whose first dimension is the token dimension; a batch is their concatenation,
    and each request receives its own slice of the outputs. Requests whose deadline (in `time.monotonic()`
    seconds) has passed when their batch is formed are dropped with `DeadlineExpiredError` before compute.
    A full queue refuses new requests with `QueueFullError` rather than growing without bound.
    """

    def __init__(
        self,
        name: str,
        compute_fn: ComputeFn,
        runner: ComputeRunner,
        *,
        max_batch_size: int,
        max_queue_size: int,
    ):
        self.name, self.compute_fn, self.runner = name, compute_fn, runner
        self._last_batch: tuple[int, float] | None = None  # (tokens, seconds) of the last computed batch
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.stats = LoadStats()
        self.on_batch: Callable[[int, float], None] | None = None
        """Called with the tokens and compute seconds of each computed batch (`peer.metrics`)."""
        self._pending: collections.deque[_Task] = collections.deque()
        self._in_flight: list[_Task] | None = None  # the batch being computed
        self._started = False

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start computing requests (they may be queued before)."""
        self._started = True
        if self._pending and self._in_flight is None:
            self._schedule()

    async def stop(self) -> None:
        """Stop computing; requests still waiting, and those of a batch being computed, fail with
        `asyncio.CancelledError`."""
        self._started = False
        for task in [*(self._in_flight or ()), *self._pending]:
            if not task.future.done():
                task.future.cancel()
        self._pending.clear()

    async def submit(
        self, tensors: Sequence[torch.Tensor], deadline: float | None = None, *, forward_id: int = 0
    ) -> list[torch.Tensor]:
        """Queue one request and wait for its outputs; `forward_id` reaches `compute_fn` if it is computed alone."""
        future = self.enqueue(tensors, deadline, forward_id=forward_id)
        with waiting_for_compute():
            return await future

    def enqueue(
        self, tensors: Sequence[torch.Tensor], deadline: float | None = None, *, forward_id: int = 0
    ) -> asyncio.Future:
        """Queue one request without waiting: the future of its outputs (cancel it to withdraw the request).

        Raises `QueueFullError` at once when the queue is full; the future fails with `DeadlineExpiredError`
        or with what the expert raised.
        """
        if len(self._pending) >= self.max_queue_size:
            raise QueueFullError(f"expert {self.name} has {len(self._pending)} requests waiting (the limit)")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Task(list(tensors), int(tensors[0].shape[0]), deadline, future, forward_id))
        if self._started and self._in_flight is None:
            self._schedule()
        return future

    def _schedule(self) -> None:
        """Form the next batch once the loop has run what is ready now: requests queued in the same tick merge."""
        self._in_flight = []
        asyncio.get_running_loop().call_soon(self._submit_next)

    def _next_batch(self) -> list[_Task]:
        batch: list[_Task] = []
        num_tokens = 0
        now = time.monotonic()
        while self._pending:
            task = self._pending[0]
            if task.future.done():  # cancelled by its caller
                self._pending.popleft()
                continue
            if task.deadline is not None and task.deadline <= now:
                self._pending.popleft()
                self.stats.requests_expired += 1
                task.future.set_exception(DeadlineExpiredError(f"deadline passed while queued for {self.name}"))
                continue
            if batch and num_tokens + task.num_tokens > self.max_batch_size:
                break
            self._pending.popleft()
            batch.append(task)
            num_tokens += task.num_tokens
        return batch

    def _submit_next(self) -> None:
        """Form the next batch from the waiting requests and hand it to the runner's next pass."""
        batch = self._next_batch() if self._started else []
        self._in_flight = batch or None
        if not batch:
            return
        inputs = _concat([task.tensors for task in batch])
        forward_id = batch[0].forward_id if len(batch) == 1 else 0
        num_tokens = sum(task.num_tokens for task in batch)
        last = self._last_batch
        expected = last[1] if last is not None and num_tokens <= last[0] else None

        def done(ok: bool, value, seconds: float) -> None:
            self._finish(batch, num_tokens, ok, value, seconds)

        self.runner.submit(self.compute_fn, (inputs, forward_id), on_done=done, expected=expected)

    def _finish(self, batch: list[_Task], num_tokens: int, ok: bool, value, seconds: float) -> None:
        """On the loop, when the batch's pass ended: give each request its slice (or the error), start the next."""
        self._in_flight = None
        if ok:
            self._last_batch = (num_tokens, seconds)
            self.stats.record_batch(num_tokens)
            if self.on_batch is not None:
                self.on_batch(num_tokens, seconds)
            if len(batch) == 1:  # one request (as an expert of a big grid mostly gets): its outputs whole
                if not batch[0].future.done():
                    batch[0].future.set_result(list(value))
            else:
                offset = 0
                for task in batch:
                    if not task.future.done():
                        task.future.set_result([t[offset : offset + task.num_tokens] for t in value])
                    offset += task.num_tokens
        else:  # the expert failed: each request of this batch gets the error
            logger.error("expert %s failed on a batch of %d requests", self.name, len(batch), exc_info=value)
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(value)
        if self._started and self._pending:
            self._submit_next()


def _concat(requests: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    if len(requests) == 1:
        return requests[0]
    return [torch.cat(parts, dim=0) for parts in zip(*requests, strict=True)]
