"""A whole local swarm (one DHT node and N peers) as real processes on 127.0.0.1: the library behind `dmoe swarm`.

`LocalSwarm` starts `dmoe dht` and then N `dmoe peer` processes, each in its own process group, with
their output in log files. It learns that a process is ready from a file the process writes atomically (the DHT
node's `--addr-file`, each peer's `--endpoint-file`), never from its output. It never leaves orphans: `stop()`
ends every process group it created, and on Linux every child gets PR_SET_PDEATHSIG(SIGTERM), so the swarm's
children shut down cleanly even when the swarm process itself is SIGKILLed. The command itself (flags, summary,
chaos) is `dmoe_cli.swarm_command`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import itertools
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from dmoe_cli.config_args import config_field as _opt
from dmoe_cli.launcher import PeerLauncher

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
LOG_TAIL_LINES = 60
PEER_STOP_TIMEOUT = 20.0  # a peer finishes in-flight work (shutdown_grace, 10 s) and saves checkpoints
DHT_STOP_TIMEOUT = 5.0
KILL_WAIT = 5.0


@dataclass
class SwarmConfig:
    """Shape of a local swarm: how many peers, which experts each hosts, and where state and logs go.

    Every field is also a `dmoe swarm` flag (`--experts-per-peer` for `experts_per_peer`) and an
    environment variable (`DMOE_EXPERTS_PER_PEER`). Experts are `PREFIX.0 … PREFIX.(N·M/R − 1)`; each is
    hosted by `replicas` different peers (see `assign_experts`).
    """

    peers: int = _opt(4, "number of peer processes")
    experts_per_peer: int = _opt(2, "experts each peer hosts")
    replicas: int = _opt(1, "peers hosting each expert (each replica on a different peer)")
    hidden_dim: int = _opt(64, "hidden size of every expert")
    prefix: str = _opt("ffn", "expert uid prefix: experts are PREFIX.0, PREFIX.1, ...")
    expert_cls: str = _opt("ffn", "expert class: ffn, swiglu, or one registered by a custom module")
    addr_file: str | None = _opt(None, "write the DHT node's multiaddrs here, one per line")
    checkpoint_dir: str | None = _opt(None, "expert checkpoints: peer i saves to and resumes from DIR/peer-<i>")
    checkpoint_every: float | None = _opt(
        None, "seconds between the peers' periodic checkpoints (default: the peer's own, or half the chaos interval)"
    )
    extra_peer_args: list[str] = _opt(
        (), "more `dmoe peer` flags for every peer (on the command line, simpler after `--`)", nargs="*"
    )
    startup_timeout: float = _opt(60.0, "seconds the DHT node, and then all the peers, may take to become ready")
    log_dir: str | None = _opt(None, "directory for the processes' logs (default: a new temporary directory)")
    chaos_kill_every: float | None = _opt(
        None, "chaos mode: SIGKILL a random peer every SECONDS, printing each kill", metavar="SECONDS"
    )
    chaos_restart: bool = _opt(
        False, "chaos mode: restart each killed peer at once; it resumes its experts from their checkpoints"
    )
    chaos_seed: int | None = _opt(None, "chaos mode: seed for the choice of peers to kill (default: random)")
    chaos_events: str | None = _opt(
        None,
        "chaos mode: append every kill and restart to this file as a JSON line (peer, pid, experts, update counts)",
        metavar="FILE",
    )
    hf_model: str | None = _opt(
        None,
        "Hugging Face MoE checkpoint folder: spread every routed expert of every layer over the peers, each with "
        "--replicas replicas (--experts-per-peer, --expert-cls and --hidden-dim are then ignored)",
        metavar="DIR",
    )
    uid_prefix: str | None = _opt(
        None, "with --hf-model: expert E of layer L is UID_PREFIX.L.E (default: --prefix)", metavar="UID_PREFIX"
    )

    @property
    def expert_prefix(self) -> str:
        """The uid prefix of the swarm's experts."""
        return (self.uid_prefix if self.hf_model and self.uid_prefix else self.prefix).rstrip(".")


_PLACEMENT_TRIES = 50_000  # sets of peers the placement search may try in all (bounds the work on big swarms)


class SwarmStartError(RuntimeError):
    """A process of the swarm did not become ready; the message carries the end of its output."""


def assign_experts(peers: int, experts_per_peer: int, replicas: int, prefix: str) -> list[list[str]]:
    """The expert uids each peer hosts: `peers` lists of `experts_per_peer` uids.

    There are `peers * experts_per_peer / replicas` experts, `PREFIX.0` onwards; each is hosted by
    `replicas` different peers. Placement is what an operator would do by hand: the replicas of each expert go
    to the least loaded peers, rotating with the expert's index, and no two experts get the same set of peers
    while distinct sets remain, so that two peers down at once take out at most one expert.
    Raises ValueError when the numbers do not fit (not divisible, or more replicas than peers).
    """
    for name, value in (("peers", peers), ("experts_per_peer", experts_per_peer), ("replicas", replicas)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    slots = peers * experts_per_peer
    if replicas > peers:
        raise ValueError(f"replicas ({replicas}) must not exceed peers ({peers}): each replica needs its own peer")
    if slots % replicas:
        raise ValueError(
            f"peers × experts_per_peer ({peers} × {experts_per_peer} = {slots}) must be divisible by "
            f"replicas ({replicas}) so that every expert has the same number of replicas"
        )
    num_experts = slots // replicas
    placement = _place(peers, experts_per_peer, replicas, num_experts, distinct=True)
    placement = placement or _place(peers, experts_per_peer, replicas, num_experts, distinct=False)
    if placement is None:  # the search ran out of budget: plain round-robin (replicas on consecutive peers)
        placement = [tuple((e * replicas + k) % peers for k in range(replicas)) for e in range(num_experts)]
    hosted: list[list[int]] = [[] for _ in range(peers)]
    for expert, combo in enumerate(placement):
        for peer in combo:
            hosted[peer].append(expert)
    return [[f"{prefix}.{index}" for index in sorted(indices)] for indices in hosted]


def assign_uids(uids: list[str], peers: int, replicas: int) -> list[list[str]]:
    """The uids each of `peers` peers hosts when every uid gets `replicas` replicas on different peers.

    Peers host at most ⌈len(uids) · replicas / peers⌉ uids each; placement as in `assign_experts`.
    """
    for name, value in (("peers", peers), ("replicas", replicas)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if replicas > peers:
        raise ValueError(f"replicas ({replicas}) must not exceed peers ({peers}): each replica needs its own peer")
    per_peer = -(-len(uids) * replicas // peers)
    placement = _place(peers, per_peer, replicas, len(uids), distinct=True)
    placement = placement or _place(peers, per_peer, replicas, len(uids), distinct=False)
    if placement is None:
        placement = [tuple((e * replicas + k) % peers for k in range(replicas)) for e in range(len(uids))]
    hosted: list[list[int]] = [[] for _ in range(peers)]
    for expert, combo in enumerate(placement):
        for peer in combo:
            hosted[peer].append(expert)
    return [[uids[index] for index in sorted(indices)] for indices in hosted]


def hf_model_uids(hf_model: str, prefix: str) -> list[str]:
    """Every routed expert of the checkpoint in `hf_model` as a uid `PREFIX.L.E`."""
    from models.hf_families import HFMoEModel, load_hf_config

    return HFMoEModel.from_config(load_hf_config(hf_model)).uids(prefix)


def _place(
    peers: int, per_peer: int, replicas: int, num_experts: int, *, distinct: bool
) -> list[tuple[int, ...]] | None:
    """For each expert, the peers of its replicas: at most `per_peer` experts per peer, each set of peers used
    once (`distinct`); a depth-first search trying the least loaded peers first, rotating with the expert.
    None when no placement is found within `_PLACEMENT_TRIES` tries."""
    load = [0] * peers
    used: set[frozenset[int]] = set()
    tries = 0

    def candidates(expert: int):
        ranked = sorted(range(peers), key=lambda peer: (load[peer], (peer - expert) % peers))
        for combo in itertools.combinations(ranked, replicas):
            if all(load[peer] < per_peer for peer in combo) and not (distinct and frozenset(combo) in used):
                yield combo

    def take(combo: tuple[int, ...], step: int) -> None:
        for peer in combo:
            load[peer] += step
        (used.add if step > 0 else used.discard)(frozenset(combo))

    chosen: list[tuple[int, ...]] = []
    stack = [candidates(0)]
    while len(chosen) < num_experts:
        tries += 1
        if tries > _PLACEMENT_TRIES:
            return None
        combo = next(stack[-1], None)
        if combo is None:  # a dead end: change the previous expert's peers
            stack.pop()
            if not stack:
                return None
            take(chosen.pop(), -1)
            continue
        take(combo, +1)
        chosen.append(combo)
        if len(chosen) < num_experts:
            stack.append(candidates(len(chosen)))
    return chosen


def _death_signal_preexec() -> object:
    """A preexec_fn that makes the child receive SIGTERM when the thread that spawned it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Process:
    """One child of the swarm: its command, its log file, and the Popen of its current run."""

    def __init__(self, name: str, args: list[str], log_path: Path):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None
        self.log_offset = 0
        self.reported_exit = False
        self._log: IO[bytes] | None = None

    def spawn(
        self, spawner: concurrent.futures.Executor, env: dict[str, str], *, launcher: PeerLauncher | None = None
    ) -> None:
        """Start a run: a new process, or one forked by `launcher` (a warm `dmoe_cli.standby`) when it is ready."""
        self.close_log()
        self._log = open(self.log_path, "ab")  # kept open while the process runs
        self.log_offset = self._log.tell()
        warm = launcher is not None and launcher.ready
        how = "starting (forked by the warm standby)" if warm else "starting"
        self._log.write(f"--- {time.strftime('%H:%M:%S')} {how}: {shlex.join(self.args)}\n".encode())
        self._log.flush()
        if warm:
            try:  # the args without `python -m dmoe_cli`
                self.popen, self.reported_exit = launcher.launch(self.args[3:], str(self.log_path)), False
                return
            except RuntimeError as exc:
                logger.warning("the warm standby could not start %s (%s); starting it afresh", self.name, exc)
        # Spawned on the swarm's long-lived spawner thread: PDEATHSIG fires when the spawning *thread* ends.
        future = spawner.submit(
            subprocess.Popen,
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_death_signal_preexec(),
        )
        self.reported_exit = False
        try:
            self.popen = future.result()
        except BaseException:  # interrupted (Ctrl-C) while spawning: keep hold of the child so stop() ends it
            if not future.cancel():
                self.popen = future.result()
            raise

    def output(self) -> str:
        """What this run of the process has printed so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of this run's output."""
        return "\n".join(self.output().rstrip("\n").splitlines()[-lines:])

    def alive(self) -> bool:
        """Whether the current run is still running."""
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the process (not its group) while it runs."""
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def sweep(self) -> None:
        """SIGKILL whatever is left of the process group (the DHT daemons a peer started, say)."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        """Wait for the process to exit; True when it did."""
        if self.popen is None:
            return True
        try:
            self.popen.wait(max(timeout, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def close_log(self) -> None:
        """Close the log file the process writes to (the process keeps its own descriptor)."""
        if self._log is not None:
            self._log.close()
            self._log = None


class LocalSwarm:
    """A local swarm as processes: one `dmoe dht` bootstrap node and N `dmoe peer` processes on 127.0.0.1.

    `start()` launches the DHT node, then all peers at once, and returns when each has written its ready file
    (SwarmStartError with the failing process's output otherwise; nothing is left running then).
    Peer i hosts `assignments[i]` (see `assign_experts`); its output goes to `log_dir/peer-<i>.log`, its
    endpoint file (see `peer.PeerConfig.endpoint_file`) to `log_dir/peer-<i>.endpoint.json`, and what that file
    said at its latest start is `peer_info[i]` (endpoint, pid, the update counts it resumed, ...).
    `kill_peer` and `restart_peer` let tests and chaos runs take peers down and up again; `stop()` ends
    everything. Use it as a context manager so that the swarm always stops.

    Limits: children are spawned from a thread the swarm owns, so the swarm may be driven from any thread;
    on Linux they get SIGTERM when the swarm process dies, even by SIGKILL (PR_SET_PDEATHSIG).
    """

    def __init__(self, config: SwarmConfig, *, verbose: bool = False):
        self.config = config
        self.verbose = verbose
        if config.hf_model:
            self._uids = hf_model_uids(config.hf_model, config.expert_prefix)
            self.assignments = assign_uids(self._uids, config.peers, config.replicas)
        else:
            self.assignments = assign_experts(config.peers, config.experts_per_peer, config.replicas, config.prefix)
            count = config.peers * config.experts_per_peer // config.replicas
            self._uids = [f"{config.prefix}.{i}" for i in range(count)]
        self.log_dir = Path(config.log_dir) if config.log_dir else Path(tempfile.mkdtemp(prefix="dmoe-swarm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.initial_peers: list[str] = []
        self.peer_endpoints: list[str | None] = [None] * config.peers
        self.peer_info: list[dict | None] = [None] * config.peers
        self._dht: _Process | None = None
        self._peers: list[_Process] = []
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._launcher: PeerLauncher | None = None  # a warm `dmoe_cli.standby` that forks restarted peers
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def uids(self) -> list[str]:
        """Every expert uid in the swarm, in order."""
        return list(self._uids)

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The current Popen of every child: the DHT node first, then the peers in order."""
        children = ([self._dht] if self._dht else []) + self._peers
        return [child.popen for child in children if child.popen is not None]

    @property
    def peer_processes(self) -> list[subprocess.Popen | None]:
        """The current Popen of each peer (None before it was started)."""
        return [child.popen for child in self._peers]

    def peer_log(self, index: int) -> Path:
        """The log file of peer `index` (its restarts append to it)."""
        return self.log_dir / f"peer-{index}.log"

    def peer_endpoint_file(self, index: int) -> Path:
        """The endpoint file peer `index` writes once it serves (removed when it stops cleanly)."""
        return self.log_dir / f"peer-{index}.endpoint.json"

    def peer_output(self, index: int) -> str:
        """What the current run of peer `index` has printed so far (since its last start or restart)."""
        return self._peers[index].output()

    def peer_checkpoint_dir(self, index: int) -> Path | None:
        """Where peer `index` keeps its experts' checkpoints (None without `checkpoint_dir`)."""
        return Path(self.config.checkpoint_dir) / f"peer-{index}" if self.config.checkpoint_dir else None

    def start(self) -> None:
        """Start the DHT node, then every peer concurrently; return once all are ready."""
        with self._lock:
            if self._dht is not None:
                raise RuntimeError("this swarm was already started")
            self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dmoe-swarm-spawner")
            try:
                self._start_dht()
                self._peers = [self._peer_process(i) for i in range(self.config.peers)]
                for index, child in enumerate(self._peers):
                    self.peer_endpoint_file(index).unlink(missing_ok=True)
                    child.spawn(self._spawner, self._env)
                readers = [self._endpoint_reader(i) for i in range(len(self._peers))]
                infos = self._wait_ready(self._peers, readers, self.config.startup_timeout)
                self.peer_info = list(infos)
                self.peer_endpoints = [info["endpoint"] for info in infos]
                if self.config.chaos_restart:  # restarts will come: the first one is warm too
                    self._start_launcher()
            except BaseException:
                self.stop()
                raise
        logger.info("swarm ready: %d peers at %s", len(self._peers), ", ".join(self.peer_endpoints))

    def _start_dht(self) -> None:
        addr_file = self.log_dir / "dht.addrs"
        addr_file.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "dmoe_cli",
            "dht",
            *(["-v"] if self.verbose else []),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--addr-file",
            str(addr_file),
        ]
        self._dht = _Process("DHT node", args, self.log_dir / "dht.log")
        self._dht.spawn(self._spawner, self._env)

        def read_addrs(_child: _Process) -> list[str] | None:
            try:  # the node writes the file atomically: once it exists, it is complete
                return [line.strip() for line in addr_file.read_text().splitlines() if line.strip()]
            except FileNotFoundError:
                return None

        (self.initial_peers,) = self._wait_ready([self._dht], [read_addrs], self.config.startup_timeout)
        if not self.initial_peers:
            raise SwarmStartError(f"the DHT node wrote no multiaddrs to {addr_file}")
        logger.info("DHT node ready at %s", self.initial_peers[0])

    def _peer_process(self, index: int) -> _Process:
        config = self.config
        args = [
            sys.executable,
            "-m",
            "dmoe_cli",
            "peer",
            *(["-v"] if self.verbose else []),
            "--initial-peers",
            *self.initial_peers,
            "--experts",
            ",".join(self.assignments[index]),
            *(
                ["--hf-model", config.hf_model]
                if config.hf_model
                else ["--expert-cls", config.expert_cls, "--hidden-dim", str(config.hidden_dim)]
            ),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--endpoint-file",
            str(self.peer_endpoint_file(index)),
        ]
        if config.checkpoint_dir:
            args += ["--checkpoint-dir", str(self.peer_checkpoint_dir(index))]
        if config.checkpoint_every is not None:
            args += ["--checkpoint-every", f"{config.checkpoint_every:g}"]
        args += list(config.extra_peer_args)
        return _Process(f"peer {index}", args, self.peer_log(index))

    def _endpoint_reader(self, index: int) -> Callable[[_Process], dict | None]:
        """Reads peer `index`'s endpoint file: its content once this run of the peer wrote it, else None."""
        path = self.peer_endpoint_file(index)

        def read(child: _Process) -> dict | None:
            try:  # written atomically: a file that exists is complete
                info = json.loads(path.read_text())
            except FileNotFoundError:
                return None
            return info if child.popen is not None and info.get("pid") == child.popen.pid else None

        return read

    def _wait_ready(
        self, children: list[_Process], readers: list[Callable[[_Process], _T | None]], timeout: float
    ) -> list[_T]:
        """Wait until `readers[i](children[i])` returns something other than None for every child; those results.

        SwarmStartError, with the end of its output, for a child that exits first or is not ready within `timeout`.
        """
        deadline = time.monotonic() + timeout
        results: dict[int, _T] = {}
        while True:
            for i, child in enumerate(children):
                if i in results:
                    continue
                result = readers[i](child)
                if result is not None:
                    results[i] = result
                elif not child.alive():
                    code = child.popen.returncode if child.popen else None
                    raise SwarmStartError(
                        f"{child.name} exited with code {code} before it was ready; its output "
                        f"({child.log_path}):\n{child.tail()}"
                    )
            if len(results) == len(children):
                return [results[i] for i in range(len(children))]
            if time.monotonic() > deadline:
                late = next(child for i, child in enumerate(children) if i not in results)
                raise SwarmStartError(
                    f"{late.name} was not ready within {timeout:.0f} s; its output ({late.log_path}):\n{late.tail()}"
                )
            time.sleep(0.1)

    def kill_peer(self, index: int, sig: int = signal.SIGKILL, *, timeout: float = PEER_STOP_TIMEOUT) -> None:
        """Send `sig` to peer `index`. SIGKILL takes down its whole process group (like a machine crash).

        For SIGKILL, SIGTERM and SIGINT, waits (up to `timeout`, then SIGKILL) until the peer has exited and
        sweeps what is left of its process group; other signals (SIGSTOP, ...) are only sent.
        """
        with self._lock:
            child = self._peers[index]
            if sig == signal.SIGKILL:
                child.sweep()
            else:
                child.signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                if not child.wait(timeout):
                    logger.warning("%s did not exit within %.0f s of signal %s; killing it", child.name, timeout, sig)
                    child.sweep()
                    child.wait(KILL_WAIT)
                child.sweep()
                child.reported_exit = True
                self.peer_endpoints[index] = None
                self.peer_info[index] = None

    def _start_launcher(self) -> None:
        """Start the warm standby that forks restarted peers (see `dmoe_cli.standby`)."""

        def spawn(args: list[str]) -> subprocess.Popen:
            return self._spawner.submit(
                subprocess.Popen,
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,
                preexec_fn=_death_signal_preexec(),
            ).result()

        self._launcher = PeerLauncher(spawn, sys.executable)

    def _stop_launcher(self) -> None:
        launcher, self._launcher = self._launcher, None
        if launcher is not None:
            launcher.stop()

    def restart_peer(self, index: int) -> None:
        """Start peer `index` again with the same arguments (and checkpoint dir; with one, the same port and peer id).

        The restart is forked from the warm standby when it is ready (`dmoe_cli.standby`: a process that has
        imported the peer's code already), else a new process. A peer still running is stopped first with
        SIGTERM. Returns once it is ready; `peer_endpoints[index]` then holds its new endpoint and
        `peer_info[index]` its endpoint file (with the update counts it resumed). The swarm is not locked while the
        peer starts, so other peers can be killed and restarted meanwhile (chaos mode does); SwarmStartError when
        it does not become ready.
        """
        with self._lock:
            if self._spawner is None:
                raise RuntimeError("the swarm is not running")
            child = self._peers[index]
            if child.alive():
                self.kill_peer(index, signal.SIGTERM)
            child.sweep()
            self.peer_endpoint_file(index).unlink(missing_ok=True)  # a SIGKILLed peer leaves its file behind
            if self._launcher is None or self._launcher.process.poll() is not None:
                self._start_launcher()  # for the next restart: this one starts afresh unless one was ready
            child.spawn(self._spawner, self._env, launcher=self._launcher)
        try:
            (info,) = self._wait_ready([child], [self._endpoint_reader(index)], self.config.startup_timeout)
        except SwarmStartError:
            with self._lock:
                child.sweep()
                child.wait(KILL_WAIT)
                child.reported_exit = True
            raise
        with self._lock:
            self.peer_endpoints[index], self.peer_info[index] = info["endpoint"], info
        logger.info("%s restarted at %s", child.name, info["endpoint"])

    def stop(self) -> None:
        """SIGTERM every peer, then the DHT node; SIGKILL whatever is left after a bounded wait. Idempotent."""
        with self._lock:
            self._stop_launcher()
            self._stop_group(self._peers, PEER_STOP_TIMEOUT)
            if self._dht is not None:
                self._stop_group([self._dht], DHT_STOP_TIMEOUT)
            for child in self._peers + ([self._dht] if self._dht else []):
                child.close_log()
                child.reported_exit = True
            if self._spawner is not None:
                self._spawner.shutdown(wait=False)
                self._spawner = None

    def _stop_group(self, children: list[_Process], timeout: float) -> None:
        running = [child for child in children if child.alive()]
        for child in running:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in running:
            if not child.wait(deadline - time.monotonic()):
                logger.warning("%s did not stop within %.0f s of SIGTERM; killing it", child.name, timeout)
                child.sweep()
                child.wait(KILL_WAIT)
        for child in children:
            child.sweep()

    def newly_exited(self) -> list[_Process]:
        """Children that exited since the last call (and were not stopped on purpose); each has `name`,
        `popen`, `log_path` and `tail(lines)` for a report."""
        with self._lock:
            exited = []
            for child in ([self._dht] if self._dht else []) + self._peers:
                if child.popen is not None and not child.reported_exit and child.popen.poll() is not None:
                    child.reported_exit = True
                    child.sweep()  # what it started (DHT daemons) must not outlive it
                    exited.append(child)
            return exited

    def __enter__(self) -> LocalSwarm:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
