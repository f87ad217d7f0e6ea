"""Shared fixtures: in-process peers on a background event loop, and real peer processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
def running_peer(*, announce: bool = False, **config) -> Iterator[Peer]:
    """A `Peer` serving gRPC on 127.0.0.1 (port 0), in the DHT when `announce`; always stopped afterwards."""
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
            loop.run(peer.stop())
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


class PeerProcess:
    """A real `dmoe peer` process; reads its endpoint from the line it prints when ready."""

    def __init__(self, args: list[str], *, env: dict | None = None, timeout: float = 60):
        self.args = args
        self.proc = subprocess.Popen(
            [*DMOE, "peer", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.endpoint = None
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("peer serving"):
                self.endpoint = line.rsplit(" at ", 1)[1].strip()
                break
        if self.endpoint is None:
            self.kill()
            raise RuntimeError("peer did not start:\n" + "".join(self.output))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def peer_processes() -> Iterator[list]:
    """Start peers with `peer_processes.append(PeerProcess(...))`; all are killed at teardown."""
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
