"""Servers for the benchmarks, each a real process: dmoe peers (with their DHT) and a hivemind MoE server.

Every side hosts the *same* experts: `peer.experts.FeedForwardExpert` modules seeded per uid exactly as a dmoe
peer seeds them (`expert_seed`), with Adam (lr 1e-3) and gradient clipping at norm 1.0, so the in-process
limit, the dmoe peers and the hivemind server start from identical weights and do identical work per step.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, child_env

SEED = 0


def expert_seed(uid: str, seed: int = SEED) -> int:
    """The torch seed a dmoe peer started with `--seed SEED` uses for expert `uid` (see `peer.Peer`)."""
    return zlib.crc32(f"{seed}/{uid}".encode())


# Children are spawned from this one long-lived thread: with PR_SET_PDEATHSIG they get SIGTERM when it ends,
# i.e. when the benchmark process dies, even by SIGKILL, so no server outlives a benchmark.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-spawner")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A child process (its own process group) whose output goes to a log file; `wait_for_file` waits for the
    JSON file it writes (atomically) once it is ready."""

    def __init__(
        self, name: str, args: Sequence[str], *, threads: int | None, log_dir: Path, tuned_allocator: bool = True
    ):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = _SPAWNER.submit(
            subprocess.Popen,
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=child_env(threads, tuned_allocator=tuned_allocator),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        ).result()

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def output(self) -> str:
        """What the process has written to its log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_file(self, path: Path, timeout: float) -> dict:
        """The JSON object this process writes to `path` when ready; RuntimeError with its log's end when it
        exits first or takes longer than `timeout` seconds. Remove a stale `path` before starting the process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # written atomically: a file that exists is complete
                return json.loads(path.read_text())
            except FileNotFoundError:
                pass
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        tail = "\n".join(self.output().splitlines()[-30:])
        raise RuntimeError(f"{self.name} did not become ready (exit code {self.popen.poll()}); its log:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL of the whole process group (its DHT daemons included)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class DmoeGroup:
    """`len(assignments)` dmoe peer processes in one DHT (the first peer's own node), peer i hosting
    `assignments[i]` (a pattern or comma list), each with `compute_threads` torch threads.

    Peers run `python -m dmoe_cli peer --seed 0 --optimizer adam --lr 1e-3 --clip-grad-norm 1.0` plus `extra_args`;
    their endpoints (and the first peer's DHT multiaddr) come from their `--endpoint-file`s in `log_dir`.
    """

    def __init__(
        self,
        name: str,
        assignments: Sequence[str],
        *,
        hidden_dim: int,
        compute_threads: int,
        device: str = "cpu",
        extra_args: Sequence[str] = (),
        log_dir: Path | None = None,
        launcher: Sequence[str] = (sys.executable, "-m", "dmoe_cli"),
        tuned_allocator: bool = True,
    ):
        self.tuned_allocator = tuned_allocator
        self.name, self.assignments, self.hidden_dim = name, list(assignments), hidden_dim
        self.launcher = list(launcher)
        self.compute_threads, self.device, self.extra_args = compute_threads, device, list(extra_args)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"dmoe-bench-{name}-"))
        self.peers: list[ServerProcess] = []
        self.endpoints: list[str] = []
        self.initial_peers: list[str] = []

    def _args(self, index: int) -> list[str]:
        args = [
            *self.launcher,
            "peer",
            "--experts",
            self.assignments[index],
            "--hidden-dim",
            str(self.hidden_dim),
            "--compute-threads",
            str(self.compute_threads),
            "--device",
            self.device,
            "--seed",
            str(SEED),
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--clip-grad-norm",
            "1.0",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--endpoint-file",
            str(self._endpoint_file(index)),
            *self.extra_args,
        ]
        if self.initial_peers:
            args += ["--initial-peers", *self.initial_peers]
        return args

    def _endpoint_file(self, index: int) -> Path:
        return self.log_dir / f"{self.name}-peer-{index}.endpoint.json"

    def _spawn(self, index: int) -> ServerProcess:
        self._endpoint_file(index).unlink(missing_ok=True)
        return ServerProcess(
            f"{self.name}-peer-{index}",
            self._args(index),
            threads=self.compute_threads,
            log_dir=self.log_dir,
            tuned_allocator=self.tuned_allocator,
        )

    def start(self, timeout: float = 120.0) -> DmoeGroup:
        """Start the first peer (a new DHT), then the others joining it; return once every peer serves."""
        first = self._spawn(0)
        self.peers.append(first)
        info = first.wait_for_file(self._endpoint_file(0), timeout)
        self.endpoints.append(info["endpoint"])
        self.initial_peers = info["dht_maddrs"][:1]
        rest = [self._spawn(i) for i in range(1, len(self.assignments))]
        self.peers += rest
        self.endpoints += [
            peer.wait_for_file(self._endpoint_file(i), timeout)["endpoint"] for i, peer in enumerate(rest, start=1)
        ]
        return self

    @property
    def pids(self) -> list[int]:
        """The peers' process ids."""
        return [peer.pid for peer in self.peers]

    def stop(self) -> None:
        """Stop every peer at once (SIGTERM, then SIGKILL of each process group)."""
        threads = [threading.Thread(target=peer.stop) for peer in self.peers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


class HivemindServer:
    """A hivemind MoE server process (`python -m bench.hivemind_server`) hosting `groups` of experts.

    `groups` maps a uid prefix (``"ffn"``) to (number of experts, hidden dim); experts are dmoe's
    `FeedForwardExpert`, seeded as a dmoe peer would seed them. `initial_peers` are its DHT's multiaddrs, read
    from the ready file the server writes (`--ready-file`).
    """

    def __init__(
        self,
        groups: dict[str, tuple[int, int]],
        *,
        threads: int,
        device: str = "cpu",
        handlers: int = 8,
        log_dir: Path | None = None,
    ):
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dmoe-bench-hivemind-"))
        self.ready_file = self.log_dir / "hivemind-server.ready.json"
        spec = ",".join(f"{prefix}:{count}:{hidden}" for prefix, (count, hidden) in groups.items())
        args = [
            sys.executable,
            "-m",
            "bench.hivemind_server",
            "--experts",
            spec,
            "--threads",
            str(threads),
            "--device",
            device,
            "--handlers",
            str(handlers),
            "--ready-file",
            str(self.ready_file),
        ]
        self.args, self.threads = args, threads
        self.ready_file.unlink(missing_ok=True)
        self.process = ServerProcess("hivemind-server", args, threads=threads, log_dir=self.log_dir)
        self.initial_peers: list[str] = []
        self.start_attempts = 1

    def start(self, timeout: float = 90.0, attempts: int = 3) -> HivemindServer:
        """Wait until serving; a server that is not ready in `timeout` s (its start was seen to hang) is killed
        and started again, up to `attempts` times."""
        while True:
            try:
                self.initial_peers = self.process.wait_for_file(self.ready_file, timeout)["initial_peers"]
                return self
            except RuntimeError:
                if self.start_attempts >= attempts:
                    raise
            self.process.stop(timeout=5)
            self.start_attempts += 1
            name = f"hivemind-server-{self.start_attempts}"
            self.ready_file.unlink(missing_ok=True)
            self.process = ServerProcess(name, self.args, threads=self.threads, log_dir=self.log_dir)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def stop(self) -> None:
        """Stop the server process and its process group."""
        self.process.stop()


def start_all(*servers) -> list:
    """Start servers concurrently (their `start()` waits for readiness); stops all of them if one fails."""
    errors: list[BaseException] = []

    def start(server) -> None:
        try:
            server.start()
        except BaseException as exc:  # reported below, after every thread has finished
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        stop_all(*servers)
        raise errors[0]
    return list(servers)


def stop_all(*servers) -> None:
    """Stop servers concurrently, never raising."""

    def stop(server) -> None:
        try:
            server.stop()
        except Exception:
            pass

    threads = [threading.Thread(target=stop, args=(server,)) for server in servers if server is not None]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
