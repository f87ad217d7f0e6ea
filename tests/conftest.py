"""Shared fixtures: in-process peers on a background event loop, and real peer processes.

Every process a fixture starts runs in its own process group (`start_new_session=True`), and teardown SIGKILLs
that whole group (`kill_process_group`), so what the process started (its DHT daemons) dies with it, also when
the test fails. On Linux it also gets SIGTERM when the test run itself dies (`dies_with_test_run`), since its own
group no longer shares the fate of the test run's (a `timeout` that kills pytest's group, say).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from dht import DHTNode, ExpertDirectory
from peer import Peer, PeerConfig
from proto import expert_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
HIDDEN = 16
DMOE = [sys.executable, "-m", "dmoe_cli"]


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run(coro)` executes a coroutine on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextmanager
def running_peer(*, announce: bool = False, withdraw_on_exit: bool = True, **config) -> Iterator[Peer]:
    """A `Peer` serving gRPC on 127.0.0.1 (port 0), in the DHT when `announce`; always stopped afterwards.

    With `withdraw_on_exit=False` the stop leaves the peer's DHT records behind, as a crash would."""
    config.setdefault("hidden_dim", 16)
    config.setdefault("experts", "ffn.[0:2]")
    config.setdefault("seed", 0)
    loop = LoopThread()
    peer = Peer(PeerConfig(**config), announce=announce)
    try:
        loop.run(peer.start())
        yield peer
    finally:
        try:
            loop.run(peer.stop(withdraw=withdraw_on_exit))
        finally:
            loop.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    with running_peer() as peer:
        yield peer


@pytest.fixture
def stub(peer: Peer) -> Iterator[expert_pb2_grpc.ExpertServiceStub]:
    with grpc.insecure_channel(peer.endpoint) as channel:
        yield expert_pb2_grpc.ExpertServiceStub(channel)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def dies_with_test_run() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive SIGTERM when the thread that starts it (the test run) ends.

    Linux only (PR_SET_PDEATHSIG; None elsewhere). Start children from the main thread, which lives as long as
    the test run.
    """
    if _LIBC is None:
        return None
    prctl, parent = _LIBC.prctl, os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the test run died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start_in_group(args: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args)` in the repository, as text, in a process group of its own that dies with the test
    run; end it with `kill_process_group`."""
    return subprocess.Popen(
        args, cwd=REPO, text=True, start_new_session=True, preexec_fn=dies_with_test_run(), **popen_kwargs
    )


def kill_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGKILL every process in the group `proc` leads (started with `start_new_session=True`) and reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def wait_for_json_file(path: Path, alive: Callable[[], bool], timeout: float) -> dict | None:
    """The JSON object a process writes atomically to `path` once ready; None when `alive()` turns false first
    or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            pass
        if not alive():
            return None
        time.sleep(0.1)
    return None


class PeerProcess:
    """A real `dmoe peer` process in its own process group; `endpoint` and `info` come from its endpoint file.

    `output` collects what it prints (for failure messages only; nothing reads state from it). `kill()` ends the
    whole process group; use the `peer_processes` fixture so that it always runs.
    """

    def __init__(self, args: list[str], *, env: dict | None = None, timeout: float = 60):
        self.args = args
        self._dir = Path(tempfile.mkdtemp(prefix="dmoe-peer-"))
        self.endpoint_file = self._dir / "endpoint.json"
        self.proc = subprocess.Popen(
            [*DMOE, "peer", *args, "--endpoint-file", str(self.endpoint_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=dies_with_test_run(),
        )
        self.output: list[str] = []
        self._killed = False
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        info = wait_for_json_file(self.endpoint_file, lambda: self.proc.poll() is None, timeout)
        if info is None or info.get("pid") != self.proc.pid:
            self.kill()
            self._drainer.join(5)
            raise RuntimeError("peer did not start:\n" + "".join(self.output))
        self.info: dict = info
        self.endpoint: str = info["endpoint"]

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM the peer (a graceful stop) and return its exit code."""
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the peer's whole process group (its DHT daemons too) and reap it; once only, so that a pid
        reused later is never signalled."""
        if not self._killed:
            self._killed = True
            kill_process_group(self.proc)
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def peer_processes() -> Iterator[list]:
    """Start peers with `peer_processes.append(PeerProcess(...))`; their process groups are killed at teardown."""
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def dht_node() -> Iterator[DHTNode]:
    node = DHTNode()
    try:
        yield node
    finally:
        node.shutdown()


@contextmanager
def swarm(dht_node: DHTNode, *peer_configs: dict) -> Iterator[list[Peer]]:
    """In-process peers announcing to `dht_node`; waits until every expert is listed."""
    with ExitStack() as stack:
        peers = []
        for config in peer_configs:
            config = {"hidden_dim": HIDDEN, "seed": 0, "initial_peers": dht_node.visible_maddrs(), **config}
            peers.append(stack.enter_context(running_peer(announce=True, **config)))
        wait_for_experts(dht_node, sum((p.uids for p in peers), []))
        yield peers


def wait_for_experts(node: DHTNode, uids: list[str], timeout: float = 20.0) -> None:
    """Wait until every replica of `uids` (a uid listed twice needs two replicas) is in the DHT."""
    directory = ExpertDirectory(node, cache_ttl=0)
    wanted = {uid: uids.count(uid) for uid in uids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = directory.get(sorted(wanted), use_cache=False)
        if all(len(found.get(uid, [])) >= count for uid, count in wanted.items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"experts {uids} did not appear in the DHT")
