"""Spot checks of honesty: a random fraction of forward requests is repeated on another replica.

Nothing proves that a peer computed honestly; comparing replicas catches one that lies consistently.
When two replicas disagree beyond the tolerance, a third (when there is one) settles it by majority and the
odd one out is banned for the rest of the run; with only two, each disagreement counts against both, and
a replica that disagreed with two different peers (and never agreed with anyone since) is banned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random

import torch

from dht import ExpertReplica
from router_client.replicas import PeerScores
from router_client.transport import ExpertCallError, ExpertTransport

logger = logging.getLogger(__name__)


def answers_agree(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: float) -> bool:
    """Whether two answers match within `tolerance`, relative to their size."""
    if [t.shape for t in a] != [t.shape for t in b]:
        return False
    for x, y in zip(a, b, strict=True):
        x, y = x.float(), y.float()
        scale = float(x.norm()) + float(y.norm()) + 1e-6
        if float((x - y).norm()) > tolerance * scale:
            return False
    return True


class Verifier:
    """Repeats `fraction` of forward requests on a second replica in the background and bans liars."""

    def __init__(
        self,
        transport: ExpertTransport,
        scores: PeerScores,
        *,
        fraction: float,
        tolerance: float,
        timeout: float = 10.0,
    ):
        self.transport, self.scores = transport, scores
        self.fraction, self.tolerance, self.timeout = fraction, tolerance, timeout
        self.checks = 0
        self.disagreements = 0
        self.liars: dict[str, str] = {}
        self._disagreed_with: dict[str, set[str]] = collections.defaultdict(set)
        self._tasks: set[asyncio.Task] = set()

    def maybe_verify(
        self,
        uid: str,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        served: ExpertReplica,
        replicas: list[ExpertReplica],
    ) -> None:
        """With probability `fraction`, check this answer against another replica (in the background)."""
        others = [r for r in replicas if r.endpoint != served.endpoint and r.endpoint not in self.liars]
        if not others or random.random() >= self.fraction:
            return
        task = asyncio.ensure_future(self._verify(uid, inputs, outputs, served, others))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, replica: ExpertReplica, uid: str, inputs) -> list[torch.Tensor] | None:
        try:
            return await self.transport.call(replica.endpoint, uid, inputs, backward=False, timeout=self.timeout)
        except ExpertCallError:
            return None

    async def _verify(self, uid, inputs, outputs, served: ExpertReplica, others: list[ExpertReplica]) -> None:
        random.shuffle(others)
        second, rest = others[0], others[1:]
        answer = await self._answer(second, uid, inputs)
        if answer is None:
            return
        self.checks += 1
        if answers_agree(outputs, answer, self.tolerance):
            self._disagreed_with.pop(served.endpoint, None)
            self._disagreed_with.pop(second.endpoint, None)
            return
        self.disagreements += 1
        logger.info("replicas of %s disagree: %s vs %s", uid, served.endpoint, second.endpoint)
        for third in rest:
            referee = await self._answer(third, uid, inputs)
            if referee is None:
                continue
            first_ok = answers_agree(outputs, referee, self.tolerance)
            second_ok = answers_agree(answer, referee, self.tolerance)
            if first_ok and not second_ok:
                self._ban(second.endpoint, f"answers of {uid} disagree with two other replicas")
            elif second_ok and not first_ok:
                self._ban(served.endpoint, f"answers of {uid} disagree with two other replicas")
            return
        for liar, other in ((served.endpoint, second.endpoint), (second.endpoint, served.endpoint)):
            self._disagreed_with[liar].add(other)
            if len(self._disagreed_with[liar]) >= 2:
                self._ban(liar, f"answers of {uid} disagreed with {len(self._disagreed_with[liar])} other peers")

    def _ban(self, endpoint: str, reason: str) -> None:
        if endpoint not in self.liars:
            self.liars[endpoint] = reason
            self.scores.ban_forever(endpoint, reason)
            logger.warning("banned %s for the rest of this run: %s", endpoint, reason)
