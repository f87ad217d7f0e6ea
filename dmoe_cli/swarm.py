"""`dmoe swarm`: a whole local swarm (one DHT node and N peers) as real processes on 127.0.0.1.

`LocalSwarm` starts `dmoe dht` and then N `dmoe peer` processes, each in its own process group, with
their output in log files. It never leaves orphans: `stop()` ends every process group it created, and
on Linux every child gets PR_SET_PDEATHSIG(SIGTERM), so the swarm's children shut down cleanly even
when the swarm process itself is SIGKILLed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dmoe_cli.config_args import add_config_arguments, config_from_args
from dmoe_cli.config_args import config_field as _opt
from dmoe_cli.logs import setup_logging

logger = logging.getLogger(__name__)

DHT_READY = "DHT node running"
PEER_READY = re.compile(r"^peer serving .* at (\S+)\s*$", re.MULTILINE)
LOG_TAIL_LINES = 60
PEER_STOP_TIMEOUT = 20.0  # a peer finishes in-flight work (shutdown_grace, 10 s) and saves checkpoints
DHT_STOP_TIMEOUT = 5.0
KILL_WAIT = 5.0

# How a Python program reaches the swarm.
PYTHON_SNIPPET = """\
    from router_client import RemoteMixtureOfExperts
    moe = RemoteMixtureOfExperts({hidden}, ({count},), "{prefix}", k_best=2, initial_peers={initial_peers!r})"""


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


class SwarmStartError(RuntimeError):
    """A process of the swarm did not become ready; the message carries the end of its output."""


def assign_experts(peers: int, experts_per_peer: int, replicas: int, prefix: str) -> list[list[str]]:
    """The expert uids each peer hosts: `peers` lists of `experts_per_peer` uids.

    There are `peers * experts_per_peer / replicas` experts, `PREFIX.0` onwards; each is hosted by
    `replicas` different peers, and replicas are spread round-robin so that neighbours share experts.
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
    # Slot s holds expert s // replicas on peer s % peers: the `replicas` copies of one expert occupy
    # consecutive slots, hence `replicas` consecutive (so distinct, as replicas <= peers) peers.
    hosted: list[list[int]] = [[] for _ in range(peers)]
    for slot in range(slots):
        hosted[slot % peers].append(slot // replicas)
    return [[f"{prefix}.{index}" for index in sorted(indices)] for indices in hosted]


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

    def spawn(self, spawner: concurrent.futures.Executor, env: dict[str, str]) -> None:
        self.close_log()
        self._log = open(self.log_path, "ab")  # kept open while the process runs
        self.log_offset = self._log.tell()
        self._log.write(f"--- {time.strftime('%H:%M:%S')} starting: {shlex.join(self.args)}\n".encode())
        self._log.flush()
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
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
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
        if self._log is not None:
            self._log.close()
            self._log = None


class LocalSwarm:
    """A local swarm as processes: one `dmoe dht` bootstrap node and N `dmoe peer` processes on 127.0.0.1.

    `start()` launches the DHT node, then all peers at once, and returns when each has printed its ready
    line (SwarmStartError with the failing process's output otherwise; nothing is left running then).
    Peer i hosts `assignments[i]` (see `assign_experts`); its output goes to `log_dir/peer-<i>.log`.
    `kill_peer` and `restart_peer` let tests and chaos runs take peers down and up again; `stop()` ends
    everything. Use it as a context manager so that the swarm always stops.

    Limits: children are spawned from a thread the swarm owns, so the swarm may be driven from any thread;
    on Linux they get SIGTERM when the swarm process dies, even by SIGKILL (PR_SET_PDEATHSIG).
    """

    def __init__(self, config: SwarmConfig, *, verbose: bool = False):
        self.config = config
        self.verbose = verbose
        self.assignments = assign_experts(config.peers, config.experts_per_peer, config.replicas, config.prefix)
        self.log_dir = Path(config.log_dir) if config.log_dir else Path(tempfile.mkdtemp(prefix="dmoe-swarm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.initial_peers: list[str] = []
        self.peer_endpoints: list[str | None] = [None] * config.peers
        self._dht: _Process | None = None
        self._peers: list[_Process] = []
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def uids(self) -> list[str]:
        """Every expert uid in the swarm, in order."""
        count = self.config.peers * self.config.experts_per_peer // self.config.replicas
        return [f"{self.config.prefix}.{i}" for i in range(count)]

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
                for child in self._peers:
                    child.spawn(self._spawner, self._env)
                endpoints = self._wait_ready(self._peers, PEER_READY, self.config.startup_timeout)
                self.peer_endpoints = list(endpoints)
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
        self._wait_ready([self._dht], re.compile(f"^{DHT_READY}", re.MULTILINE), self.config.startup_timeout)
        self.initial_peers = [line.strip() for line in addr_file.read_text().splitlines() if line.strip()]
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
            "--expert-cls",
            config.expert_cls,
            "--hidden-dim",
            str(config.hidden_dim),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        if config.checkpoint_dir:
            args += ["--checkpoint-dir", str(self.peer_checkpoint_dir(index))]
        if config.checkpoint_every is not None:
            args += ["--checkpoint-every", f"{config.checkpoint_every:g}"]
        args += list(config.extra_peer_args)
        return _Process(f"peer {index}", args, self.peer_log(index))

    def _wait_ready(self, children: list[_Process], ready: re.Pattern, timeout: float) -> list[str]:
        """Wait until each child's output matches `ready`; returns the first group of each match (or '')."""
        deadline = time.monotonic() + timeout
        results: dict[int, str] = {}
        while True:
            for i, child in enumerate(children):
                if i in results:
                    continue
                match = ready.search(child.output())
                if match:
                    results[i] = match.group(1) if ready.groups else ""
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

    def restart_peer(self, index: int) -> None:
        """Start peer `index` again with the same arguments (and checkpoint dir); it may get a new port.

        A peer still running is stopped first with SIGTERM. Returns once it is ready; `peer_endpoints[index]`
        then holds its new endpoint. The swarm is not locked while the peer starts, so other peers can be
        killed and restarted meanwhile (chaos mode does); SwarmStartError when it does not become ready.
        """
        with self._lock:
            if self._spawner is None:
                raise RuntimeError("the swarm is not running")
            child = self._peers[index]
            if child.alive():
                self.kill_peer(index, signal.SIGTERM)
            child.sweep()
            child.spawn(self._spawner, self._env)
        try:
            (endpoint,) = self._wait_ready([child], PEER_READY, self.config.startup_timeout)
        except SwarmStartError:
            with self._lock:
                child.sweep()
                child.wait(KILL_WAIT)
                child.reported_exit = True
            raise
        with self._lock:
            self.peer_endpoints[index] = endpoint
        logger.info("%s restarted at %s", child.name, endpoint)

    def stop(self) -> None:
        """SIGTERM every peer, then the DHT node; SIGKILL whatever is left after a bounded wait. Idempotent."""
        with self._lock:
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

    def _newly_exited(self) -> list[_Process]:
        """Children that exited since the last call (and were not stopped on purpose)."""
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


def _summary(swarm: LocalSwarm) -> str:
    config = swarm.config
    uids = swarm.uids
    maddr = swarm.initial_peers[0]
    replicas = f"{config.replicas} replica{'s' if config.replicas > 1 else ''} each"
    lines = [
        f"dmoe swarm: {config.peers} peers serving {len(uids)} experts ({uids[0]} … {uids[-1]}, "
        f"{replicas}, {config.expert_cls}, hidden {config.hidden_dim})",
        f"DHT node: {maddr}",
    ]
    for i, (endpoint, hosted, popen) in enumerate(
        zip(swarm.peer_endpoints, swarm.assignments, swarm.peer_processes, strict=True)
    ):
        lines.append(f"  peer {i}  {endpoint:<21}  pid {popen.pid:<8} {' '.join(hosted)}")
    lines += [
        f"logs: {swarm.log_dir} (dht.log, peer-<i>.log)",
        *([f"checkpoints: {config.checkpoint_dir}/peer-<i>"] if config.checkpoint_dir else []),
        *([f"DHT multiaddrs written to {config.addr_file}"] if config.addr_file else []),
        "",
        "Connect to it:",
        f"    dmoe status --initial-peers {maddr} --prefix {config.prefix}",
        PYTHON_SNIPPET.format(initial_peers=[maddr], hidden=config.hidden_dim, count=len(uids), prefix=config.prefix),
        "",
        "Ctrl-C (or SIGTERM) stops the swarm.",
    ]
    return "\n".join(lines)


def run_swarm(config: SwarmConfig, *, verbose: bool = False) -> int:
    """Run a local swarm until SIGINT/SIGTERM: start it, print how to use it, report peers that die, stop it.

    Returns the exit code: 0 after a clean stop, 1 when the swarm failed to start.
    """
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():
            print("already stopping; please wait", file=sys.stderr, flush=True)
            return
        stopping.set()
        raise KeyboardInterrupt

    from dmoe_cli.chaos import Chaos, prepare_chaos

    swarm = LocalSwarm(config, verbose=verbose)
    chaos_line = prepare_chaos(swarm.config, swarm.log_dir)  # ValueError for impossible settings, before anything runs
    chaos: Chaos | None = None
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting a DHT node and {config.peers} peers (logs in {swarm.log_dir}) ...", flush=True)
        if chaos_line:
            print(chaos_line, flush=True)
        try:
            swarm.start()
        except SwarmStartError as error:
            print(f"the swarm failed to start: {error}", file=sys.stderr, flush=True)
            return 1
        if config.addr_file:
            Path(config.addr_file).write_text("".join(f"{m}\n" for m in swarm.initial_peers))
        print(_summary(swarm), flush=True)
        if config.chaos_kill_every:
            chaos = Chaos(swarm, config.chaos_kill_every, restart=config.chaos_restart, seed=config.chaos_seed)
            chaos.start()
        while not stopping.wait(1.0):
            for child in swarm._newly_exited():
                print(
                    f"{child.name} (pid {child.popen.pid}) exited unexpectedly with code {child.popen.returncode}; "
                    f"not restarting it. The end of its log ({child.log_path}):\n{child.tail(20)}",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        if chaos is not None:
            chaos.stop()
        print("stopping the swarm ...", flush=True)
        swarm.stop()
        if chaos is not None:
            chaos.join(10.0)
            print(chaos.summary(), flush=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("swarm stopped", flush=True)
    return 0


def add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dmoe swarm`: one per SwarmConfig field, and `dmoe peer` flags after `--`."""
    add_config_arguments(parser, SwarmConfig)
    parser.add_argument(
        "peer_args",
        nargs="*",
        metavar="-- PEER_FLAGS",
        help="flags passed to every `dmoe peer`, after `--` (e.g. `-- --lr 0.01 --optimizer sgd`)",
    )


def run_swarm_command(args: argparse.Namespace) -> int:
    """`dmoe swarm`: run a local swarm until Ctrl-C."""
    setup_logging(args.verbose)
    config = config_from_args(SwarmConfig, args)
    config.extra_peer_args = [*config.extra_peer_args, *getattr(args, "peer_args", [])]
    return run_swarm(config, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    """`python -m dmoe_cli.swarm`: the same as `dmoe swarm`."""
    parser = argparse.ArgumentParser(prog="dmoe swarm", description="run a whole local swarm as processes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_swarm_arguments(parser)
    return run_swarm_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
