"""Keeps the hosted experts' DHT records alive: re-declares them well before they expire."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from dht import ExpertDirectory

logger = logging.getLogger(__name__)


class Announcer:
    """Declares `uids` at `endpoint` every `update_period` seconds with records valid for `expiration` s.

    Each declaration carries the current load figures from `load_fn()` (uid -> {queue_size, tokens_per_second}).
    When a declaration fails, the next attempt comes sooner (a fifth of the period). Cancelling the task that
    runs `run()` stops the renewals; the records then expire on their own.
    """

    def __init__(
        self,
        directory: ExpertDirectory,
        uids: Sequence[str],
        endpoint: str,
        *,
        expert_cls: str,
        load_fn: Callable[[], Mapping[str, Mapping]],
        update_period: float = 20.0,
        expiration: float = 60.0,
    ):
        if update_period >= expiration:
            raise ValueError(f"update period ({update_period} s) must be shorter than the expiration ({expiration} s)")
        self.directory, self.uids, self.endpoint = directory, list(uids), endpoint
        self.expert_cls, self.load_fn = expert_cls, load_fn
        self.update_period, self.expiration = update_period, expiration
        self.declared_once = asyncio.Event()

    async def announce_once(self) -> bool:
        """Declare every hosted expert now; True when all records were stored."""
        stored = await self.directory.declare(
            self.uids,
            self.endpoint,
            expiration=self.expiration,
            expert_cls=self.expert_cls,
            load=self.load_fn(),
            timeout=min(self.update_period, 30.0),
            return_future=True,
        )
        failed = [uid for uid, ok in stored.items() if not ok]
        if failed:
            logger.warning("could not store the DHT records of %d experts: %s", len(failed), failed[:5])
        return not failed

    async def run(self) -> None:
        """Announce forever (until cancelled)."""
        while True:
            delay = self.update_period
            try:
                if await self.announce_once():
                    self.declared_once.set()
                else:
                    delay = self.update_period / 5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("announcing experts failed (%s); retrying in %.1f s", exc, self.update_period / 5)
                delay = self.update_period / 5
            await asyncio.sleep(delay)
