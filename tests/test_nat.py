"""A volunteer behind NAT serves through a libp2p relay: network namespaces with a masquerading router.

Public side (one bridge, 10.79.0.0/24): the DHT bootstrap node, which also relays (every `dmoe dht` node does),
the training client and, later, a public peer. Home side: a peer at 192.168.79.2 behind a NAT router namespace
that masquerades and lets no connection in (`bench.netns.Topology.add_behind_nat`); the client even routes
192.168.79.0/24 to that router, so only the NAT stops it. The home peer runs with ``--reachability private``.

The test first shows that the client cannot open a TCP connection to the home peer's gRPC port, then trains
over the swarm while the home peer alone hosts the experts (its experts answer through the relay and the loss
falls), then starts a public replica (`dmoe status` shows each replica's transport) and kills the relay mid-run:
the client fails over to the replica. Needs root and iptables (`.ci/run` installs iptables); skipped, saying
why, only where namespaces are not permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.netns import (
    Process,
    Topology,
    build_nat_swarm,
    dht_argv,
    driver_argv,
    nat_unavailable,
    peer_argv,
    served,
    stop_all,
    wait_steps,
)
from bench.netns import driver_steps as steps
from tests.conftest import REPO

pytestmark = pytest.mark.slow

PUBLIC, HOME = "10.79.0", "192.168.79"
DHT_PORT, PEER_PORT = 31337, 31330
IDENTITY = REPO / "deploy" / "dht-identity.key"  # fixed peer id: the bootstrap multiaddr is known in advance
NUM_EXPERTS, HIDDEN = 4, 32


@dataclass
class NatSwarm:
    topology: Topology
    initial_peer: str
    workdir: Path
    processes: list[Process]
    dht: Process
    home: dict  # the home peer's endpoint file

    def peer(self, name: str, *extra: str) -> Process:
        """Start a peer in namespace `name`, hosting the test's experts."""
        prefix = [*self.topology.exec_prefix(name), sys.executable]
        experts = f"ffn.[0:{NUM_EXPERTS}]"
        endpoint_file = self.workdir / f"{name}.json"
        argv = peer_argv(prefix, self.initial_peer, experts, HIDDEN, endpoint_file, "--port", str(PEER_PORT), *extra)
        process = Process(argv, self.workdir / f"{name}.log")
        self.processes.append(process)
        return process

    def status(self, *flags: str):
        """`dmoe status` run from the client's namespace: its JSON document with ``--json``, else its table."""
        argv = [*self.topology.exec_prefix("client"), sys.executable, "-m", "dmoe_cli", "status"]
        result = subprocess.run(
            [*argv, "--initial-peers", self.initial_peer, *flags], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout) if "--json" in flags else result.stdout

    def driver(self) -> tuple[Process, Path]:
        stop_file = self.workdir / "driver.stop"
        prefix = [*self.topology.exec_prefix("client"), sys.executable]
        argv = driver_argv(prefix, self.initial_peer, NUM_EXPERTS, HIDDEN, stop_file)
        process = Process(argv, self.workdir / "driver.log")
        self.processes.append(process)
        return process, stop_file


def tcp_connects(topology: Topology, name: str, host: str, port: int, timeout: float = 3.0) -> str:
    """From namespace `name`: "connected", or why a TCP connection to host:port could not be opened."""
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close(); print('connected')\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run(
        [*topology.exec_prefix(name), sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() or result.stderr.strip()


@pytest.fixture(scope="module")
def nat_swarm(tmp_path_factory) -> Iterator[NatSwarm]:
    reason = nat_unavailable()
    if reason:
        pytest.skip(reason)
    from hivemind.p2p import PeerID

    workdir = tmp_path_factory.mktemp("nat")
    topology = Topology(f"dnat{os.getpid()}")
    processes: list[Process] = []
    try:
        try:
            build_nat_swarm(topology, PUBLIC, HOME)
            topology.route("client", f"{HOME}.0/24", f"{PUBLIC}.2")
        except RuntimeError as error:
            pytest.skip(f"cannot build namespaces with a NAT router here: {error}")
        peer_id = PeerID.from_identity(IDENTITY.read_bytes()).to_base58()
        initial_peer = f"/ip4/{PUBLIC}.1/tcp/{DHT_PORT}/p2p/{peer_id}"
        dht = Process(
            dht_argv(
                [*topology.exec_prefix("dht"), sys.executable], f"{PUBLIC}.1", DHT_PORT, IDENTITY, workdir / "dht.addrs"
            ),
            workdir / "dht.log",
        )
        processes.append(dht)
        dht.wait_for_file(workdir / "dht.addrs", 60)
        swarm = NatSwarm(topology, initial_peer, workdir, processes, dht, {})
        home = swarm.peer("home", "--reachability", "private")
        swarm.home = json.loads(home.wait_for_file(workdir / "home.json", 90))
        yield swarm
    finally:
        stop_all(processes)
        topology.cleanup()


def test_a_peer_behind_nat_trains_through_the_relay_and_the_client_fails_over_when_the_relay_dies(nat_swarm):
    swarm = nat_swarm
    relayed = swarm.home["endpoint"]
    assert swarm.home["transport"] == "relayed" and "/p2p-circuit/" in relayed, swarm.home
    assert relayed.startswith(f"/ip4/{PUBLIC}.1/tcp/{DHT_PORT}/"), "it is reached through the DHT node's relay"

    # the client cannot reach the home peer's gRPC port, though it can reach the public side
    assert tcp_connects(swarm.topology, "client", f"{PUBLIC}.1", DHT_PORT) == "connected"
    for host in (f"{HOME}.2", f"{PUBLIC}.2"):  # the peer itself, and its router's public address
        outcome = tcp_connects(swarm.topology, "client", host, PEER_PORT)
        assert outcome != "connected", f"the NAT let a connection to {host}:{PEER_PORT} in"
    assert tcp_connects(swarm.topology, "home", f"{PUBLIC}.1", DHT_PORT) == "connected", "outbound works"

    # training with the home peer as the only host: its experts answer through the relay
    driver, stop_file = swarm.driver()
    try:
        first = wait_steps(driver, 25, timeout=120)
        assert all(record["ok"] for record in first), [r["error"] for r in first if not r["ok"]]
        assert served(first, relayed) >= 25, "the relayed peer served the steps"
        losses = [record["loss"] for record in first]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"the loss falls: {losses}"
        assert sum(record["masked"] for record in first[5:]) == 0, "every token was served"

        # a public replica joins; then the relay dies mid-run
        public = swarm.peer("public", "--announce-host", f"{PUBLIC}.11")
        direct = json.loads(public.wait_for_file(swarm.workdir / "public.json", 90))["endpoint"]
        assert direct == f"{PUBLIC}.11:{PEER_PORT}"
        joined = len(steps(driver))
        deadline = time.monotonic() + 60
        while served(steps(driver)[joined:], direct) == 0:
            assert time.monotonic() < deadline, "the client never used the public replica"
            time.sleep(0.5)
        status = swarm.status("--json")
        transports = {r["endpoint"]: r["transport"] for rs in status["experts"].values() for r in rs}
        assert transports == {relayed: "relayed", direct: "direct"}, transports
        table = swarm.status()
        assert "relayed" in table and "direct" in table and f"{PUBLIC}.1:{DHT_PORT}~" in table, table
        swarm.dht.stop(timeout=0.1)  # SIGTERM then SIGKILL: the relay is gone
        killed = len(steps(driver))
        after = wait_steps(driver, killed + 40, timeout=180)[killed:]
        settled = after[10:]
        assert all(record["ok"] for record in after), [r["error"] for r in after if not r["ok"]]
        assert served(settled, relayed) == 0, "nothing is answered through a dead relay"
        assert served(settled, direct) >= len(settled), "the public replica took over"
        assert sum(record["masked"] for record in settled) == 0, "every token is still served"
    finally:
        stop_file.touch()
        try:
            driver.proc.wait(30)
        finally:
            driver.stop(timeout=0.1)
    relay_seconds = sorted(record["seconds"] for record in first[5:])
    direct_seconds = sorted(record["seconds"] for record in settled)
    print(
        f"\nstep p50: {relay_seconds[len(relay_seconds) // 2] * 1e3:.1f} ms through the relay, "
        f"{direct_seconds[len(direct_seconds) // 2] * 1e3:.1f} ms direct (gRPC)"
    )
