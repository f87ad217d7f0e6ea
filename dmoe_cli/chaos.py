"""Chaos mode (`dmoe swarm --chaos-kill-every SECONDS [--chaos-restart]`): peers crash, the swarm carries on.

`Chaos` SIGKILLs a random running peer of a `LocalSwarm` every `interval` seconds, like a machine that loses
power: no goodbye, no last checkpoint, its DHT records left to expire. With `restart`, the killed peer is started
again at once with the same arguments; it resumes its experts from the checkpoints they had on disk when it
died. Each event is printed (and kept in `events`, and with `events_file` appended to that file as a JSON line,
see `ChaosEvent.record`): a kill names the peer, its pid, its experts and the update counts their checkpoints
hold; a restart names its new endpoint, how long it took and the update counts the restarted peer resumed (read
from its endpoint file, `LocalSwarm.peer_info`), so a resume that lost updates shows at once (`mismatches()`).

A peer that is restarting is never picked; kills go on while others restart. Peers that exited by themselves
are left to `dmoe swarm`'s own report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dmoe_cli.swarm import LocalSwarm, SwarmConfig, SwarmStartError

logger = logging.getLogger(__name__)


@dataclass
class ChaosEvent:
    """One thing chaos did: `kind` is "kill", "restart" or "restart-failed"."""

    kind: str
    peer: int
    at: float  # seconds since chaos started
    uids: list[str]
    pid: int | None = None
    endpoint: str | None = None
    # kill: the update count each expert's checkpoint held at the kill (None: no checkpoint);
    # restart: the count the restarted peer resumed each expert from (0: started afresh)
    update_counts: dict[str, int | None] = field(default_factory=dict)
    checkpointed: dict[str, int | None] = field(default_factory=dict)  # restart: the counts at the kill
    seconds: float | None = None  # restart: how long the peer took to be ready again
    error: str | None = None

    @property
    def resumed_as_checkpointed(self) -> bool:
        """For a restart: every expert resumed exactly the update count its checkpoint held at the kill."""
        return all(self.update_counts.get(uid, 0) == (count or 0) for uid, count in self.checkpointed.items())

    def record(self) -> dict:
        """The event as a JSON-ready dict: its fields, the uids as `experts`, and for a restart whether it
        `resumed_as_checkpointed`. One line of `--chaos-events` (the update count keys are uids)."""
        record = dataclasses.asdict(self)
        record["experts"] = record.pop("uids")
        if self.kind == "restart":
            record["resumed_as_checkpointed"] = self.resumed_as_checkpointed
        return record

    def describe(self) -> str:
        """One line for humans (and tests): what happened to which peer and its experts."""
        counts = " ".join(f"{uid}={'none' if n is None else n}" for uid, n in self.update_counts.items())
        head = f"chaos +{self.at:.1f}s:"
        if self.kind == "kill":
            return f"{head} SIGKILL peer {self.peer} (pid {self.pid}; {' '.join(self.uids)}); checkpoints hold {counts}"
        if self.kind == "restart":
            verdict = "as checkpointed" if self.resumed_as_checkpointed else "MISMATCH with the checkpoints at the kill"
            return (
                f"{head} restarted peer {self.peer} (pid {self.pid}) at {self.endpoint} in {self.seconds:.1f} s; "
                f"resumed {counts} ({verdict})"
            )
        return f"{head} peer {self.peer} could not be restarted: {self.error}"


def print_event(event: ChaosEvent) -> None:
    """The default `on_event`: print the event's line."""
    print(event.describe(), flush=True)


class Chaos:
    """SIGKILL a random running peer of `swarm` every `interval` seconds; with `restart`, start it again.

    `start()` begins (the first kill comes after one interval), `stop()` ends the kills, `join()` waits for
    restarts in progress (stop the swarm first to cut them short). `on_event(event)` is called for every
    event, from chaos's own threads (default: print it). `seed` makes the choice of peers reproducible.
    With `events_file`, every event is also appended to that file as one JSON line (`ChaosEvent.record`), written
    and flushed as it happens.
    """

    def __init__(
        self,
        swarm: LocalSwarm,
        interval: float,
        *,
        restart: bool = False,
        seed: int | None = None,
        on_event: Callable[[ChaosEvent], None] | None = print_event,
        events_file: str | Path | None = None,
    ):
        if not interval > 0:
            raise ValueError(f"the chaos interval must be positive, got {interval}")
        self.swarm, self.interval, self.restart = swarm, float(interval), restart
        self.on_event = on_event
        self.events: list[ChaosEvent] = []
        self._rng = random.Random(seed)
        self._stopping = threading.Event()
        self._restarting: set[int] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._idle_reported = False
        self.events_file = Path(events_file) if events_file is not None else None
        self._events_out: IO[str] | None = None

    def start(self) -> Chaos:
        """Start killing peers, in a background thread."""
        if self.events_file is not None and self._events_out is None:
            self.events_file.parent.mkdir(parents=True, exist_ok=True)
            self._events_out = open(self.events_file, "a")
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dmoe-chaos", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop killing peers (restarts in progress go on; see `join`)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for restarts in progress (at most `timeout` seconds in all); closes the events file once they end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._stopping.is_set() and not any(thread.is_alive() for thread in self._threads):
            with self._lock:
                if self._events_out is not None:
                    self._events_out.close()
                    self._events_out = None

    def __enter__(self) -> Chaos:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def kills(self) -> list[ChaosEvent]:
        """The kill events so far."""
        return [event for event in self.events if event.kind == "kill"]

    @property
    def restarts(self) -> list[ChaosEvent]:
        """The successful restart events so far."""
        return [event for event in self.events if event.kind == "restart"]

    def mismatches(self) -> list[ChaosEvent]:
        """Restarts whose peer did not resume exactly the update counts its checkpoints held at the kill."""
        return [event for event in self.restarts if not event.resumed_as_checkpointed]

    def summary(self) -> str:
        """One line: kills, restarts, and whether every restarted peer resumed its checkpointed update counts."""
        failed = sum(event.kind == "restart-failed" for event in self.events)
        line = f"chaos: {len(self.kills)} kills, {len(self.restarts)} restarts"
        if failed:
            line += f", {failed} failed restarts"
        if self.restarts:
            bad = self.mismatches()
            line += (
                "; every restarted peer resumed its experts' checkpointed update counts"
                if not bad
                else f"; {len(bad)} restarts did NOT resume the checkpointed update counts (peers "
                + ", ".join(str(event.peer) for event in bad)
                + ")"
            )
        return line

    # ------------------------------------------------------------------ internals

    def _emit(self, event: ChaosEvent) -> None:
        with self._lock:
            self.events.append(event)
            if self._events_out is not None:
                self._events_out.write(json.dumps(event.record()) + "\n")
                self._events_out.flush()
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logger.exception("chaos on_event failed")

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _run(self) -> None:
        next_kill = time.monotonic() + self.interval
        while not self._stopping.wait(max(0.0, next_kill - time.monotonic())):
            next_kill += self.interval
            try:
                self._kill_one()
            except Exception:
                logger.exception("chaos could not kill a peer")

    def _kill_one(self) -> None:
        swarm = self.swarm
        with self._lock:
            restarting = set(self._restarting)
        candidates = [
            index
            for index, popen in enumerate(swarm.peer_processes)
            if index not in restarting and popen is not None and popen.poll() is None
        ]
        if not candidates:
            if not self._idle_reported:
                print(f"chaos +{self._now():.1f}s: no running peer to kill", flush=True)
                self._idle_reported = True
            return
        self._idle_reported = False
        index = self._rng.choice(candidates)
        pid = swarm.peer_processes[index].pid
        swarm.kill_peer(index, timeout=5.0)  # SIGKILL: the peer and its DHT daemons, all at once
        uids = list(swarm.assignments[index])
        event = ChaosEvent("kill", index, self._now(), uids, pid=pid, update_counts=self._checkpointed(index, uids))
        self._emit(event)
        if self.restart:
            with self._lock:
                self._restarting.add(index)
            thread = threading.Thread(target=self._restart, args=(event,), name=f"dmoe-chaos-restart-{index}")
            thread.daemon = True
            self._threads.append(thread)
            thread.start()

    def _checkpointed(self, index: int, uids: list[str]) -> dict[str, int | None]:
        directory = self.swarm.peer_checkpoint_dir(index)
        if directory is None:
            return {uid: None for uid in uids}
        from peer import CheckpointError, load_checkpoint

        counts: dict[str, int | None] = {}
        for uid in uids:
            try:
                state = load_checkpoint(directory, uid)
            except CheckpointError as error:
                logger.error("%s", error)
                state = None
            counts[uid] = None if state is None else int(state["update_count"])
        return counts

    def _restart(self, kill: ChaosEvent) -> None:
        index, started = kill.peer, time.monotonic()
        try:  # the peer stays off the kill list until its restart event is out
            try:
                self.swarm.restart_peer(index)
            except (SwarmStartError, RuntimeError) as error:
                if not self._stopping.is_set():
                    self._emit(ChaosEvent("restart-failed", index, self._now(), kill.uids, error=str(error)[:2000]))
                return
            info = self.swarm.peer_info[index] or {}
            resumed = {uid: info.get("resumed", {}).get(uid) or 0 for uid in kill.uids}
            self._emit(
                ChaosEvent(
                    "restart",
                    index,
                    self._now(),
                    kill.uids,
                    pid=info.get("pid"),
                    endpoint=info.get("endpoint"),
                    update_counts=resumed,
                    checkpointed=dict(kill.update_counts),
                    seconds=time.monotonic() - started,
                )
            )
        finally:
            with self._lock:
                self._restarting.discard(index)


def prepare_chaos(config: SwarmConfig, log_dir: Path) -> str:
    """Check and complete `config` for chaos mode; returns the line that announces it.

    With `chaos_restart`, peers need checkpoints to resume from: without `checkpoint_dir`, LOG_DIR/checkpoints
    is used, and without `checkpoint_every`, peers save every half interval (a SIGKILL loses what changed since).
    """
    if config.chaos_kill_every is None:
        if config.chaos_restart:
            raise ValueError("--chaos-restart needs --chaos-kill-every SECONDS")
        return ""
    if not config.chaos_kill_every > 0:
        raise ValueError(f"--chaos-kill-every must be positive, got {config.chaos_kill_every}")
    line = f"chaos: SIGKILL a random peer every {config.chaos_kill_every:g} s"
    if not config.chaos_restart:
        return line + " (not restarted: add --chaos-restart)"
    if not config.checkpoint_dir:
        config.checkpoint_dir = str(Path(log_dir) / "checkpoints")
    if config.checkpoint_every is None:
        config.checkpoint_every = max(0.5, min(60.0, config.chaos_kill_every / 2))
    return (
        f"{line}, restarted at once from its checkpoints in {config.checkpoint_dir}/peer-<i> "
        f"(saved every {config.checkpoint_every:g} s)"
    )
