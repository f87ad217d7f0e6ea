"""Per-expert batching: concurrent requests from many clients are merged into one compute batch."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from peer.compute import INLINE_MAX_SECONDS, ComputeRunner
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
    `max_batch_size` tokens, and computes each batch with the peer's `ComputeRunner`: on the event loop
    when the last batch of this queue took under `INLINE_MAX_SECONDS` and this one is no larger, else on the
    compute thread.

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
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batching-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting fail with `asyncio.CancelledError`."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                task.future.cancel()

    async def submit(
        self, tensors: Sequence[torch.Tensor], deadline: float | None = None, *, forward_id: int = 0
    ) -> list[torch.Tensor]:
        """Queue one request and wait for its outputs; `forward_id` reaches `compute_fn` if it is computed alone."""
        if len(self._pending) >= self.max_queue_size:
            raise QueueFullError(f"expert {self.name} has {len(self._pending)} requests waiting (the limit)")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Task(list(tensors), int(tensors[0].shape[0]), deadline, future, forward_id))
        self._wakeup.set()
        with waiting_for_compute():
            return await future

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

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._next_batch()
            if not batch:
                continue
            inputs = _concat([task.tensors for task in batch])
            forward_id = batch[0].forward_id if len(batch) == 1 else 0
            num_tokens = sum(task.num_tokens for task in batch)
            last = self._last_batch
            inline = last is not None and last[1] <= INLINE_MAX_SECONDS and num_tokens <= last[0]
            started = time.perf_counter()
            try:
                outputs = await self.runner.run(self.compute_fn, inputs, forward_id, inline=inline)
            except asyncio.CancelledError:
                for task in batch:
                    task.future.cancel()
                raise
            except Exception as exc:  # the expert failed: each request of this batch gets the error
                logger.exception("expert %s failed on a batch of %d requests", self.name, len(batch))
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(exc)
                continue
            self._last_batch = (num_tokens, time.perf_counter() - started)
            self.stats.record_batch(num_tokens)
            if self.on_batch is not None:
                self.on_batch(num_tokens, self._last_batch[1])
            offset = 0
            for task in batch:
                if not task.future.done():
                    task.future.set_result([t[offset : offset + task.num_tokens] for t in outputs])
                offset += task.num_tokens


def _concat(requests: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    if len(requests) == 1:
        return requests[0]
    return [torch.cat(parts, dim=0) for parts in zip(*requests, strict=True)]
