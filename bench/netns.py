"""Simulated machines for the multi-host tests and benchmarks: network namespaces joined by a bridge, and NAT.

`Topology` builds namespaces on one bridge (each a "machine" with its own address; nothing touches the host's
interfaces or routes), `add_behind_nat` puts a "home" namespace behind a masquerading router namespace that
lets no connection in, and `Process` runs a command in a namespace and collects its output. Needs root
(CAP_SYS_ADMIN, and iptables for NAT); `netns_unavailable` and `nat_unavailable` say why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_command(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (30 s at most); raises `RuntimeError` with its stderr when it fails and `check`."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dmoe-probe-{os.getpid()}"
    result = run_command("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}"
    run_command("ip", "netns", "del", probe, check=False)
    return None


def nat_unavailable() -> str | None:
    """Why a NAT router namespace cannot be built here (no netns, or no iptables), or None when it can."""
    reason = netns_unavailable()
    if reason:
        return reason
    if shutil.which("iptables") is None:
        return "iptables is not installed (.ci/run installs it)"
    return None


@dataclass
class Topology:
    """Namespaces on one bridge: `add(name, ip)` creates a namespace whose eth0 has `ip`; `cleanup()` removes all.

    The bridge and the host-side end of every veth pair live in the namespace `<tag>-br`, so the host's own
    network is never touched. `cut(name)`/`restore(name)` unplug and replug a namespace's cable (its veth end on
    the bridge); `delay(name, ms)` adds netem latency to everything the namespace sends.
    """

    tag: str
    nodes: dict[str, str] = field(default_factory=dict)  # name -> namespace

    @property
    def bridge(self) -> str:
        return f"{self.tag}-br"

    def create(self) -> None:
        run_command("ip", "netns", "add", self.bridge)
        run_command("ip", "-n", self.bridge, "link", "set", "lo", "up")
        run_command("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run_command("ip", "-n", self.bridge, "link", "set", "br0", "up")

    def add(self, name: str, address: str) -> None:
        namespace = f"{self.tag}-{name}"
        run_command("ip", "netns", "add", namespace)
        self.nodes[name] = namespace
        run_command("ip", "-n", namespace, "link", "set", "lo", "up")
        run_command(
            "ip",
            "-n",
            self.bridge,
            "link",
            "add",
            f"v-{name}",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            namespace,
        )
        run_command("ip", "-n", self.bridge, "link", "set", f"v-{name}", "master", "br0", "up")
        run_command("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        run_command("ip", "-n", namespace, "link", "set", "eth0", "up")

    def add_behind_nat(self, name: str, router: str, public: str, home: str) -> None:
        """A namespace `name` at `home` (a /24) behind a NAT router namespace `router` at `public` on the bridge.

        The router masquerades what `name` sends and forwards back only replies (conntrack ESTABLISHED): like a
        home router, it lets no connection in, even from machines that route `home`'s subnet to it.
        """
        self.add(router, public)
        namespace = self.nodes[name] = f"{self.tag}-{name}"
        run_command("ip", "netns", "add", namespace)
        run_command("ip", "-n", namespace, "link", "set", "lo", "up")
        outer = self.nodes[router]
        run_command(
            "ip", "-n", outer, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", namespace
        )
        gateway = home.rsplit(".", 1)[0] + ".1"
        run_command("ip", "-n", outer, "addr", "add", f"{gateway}/24", "dev", "eth1")
        run_command("ip", "-n", outer, "link", "set", "eth1", "up")
        run_command("ip", "-n", namespace, "addr", "add", f"{home}/24", "dev", "eth0")
        run_command("ip", "-n", namespace, "link", "set", "eth0", "up")
        run_command("ip", "-n", namespace, "route", "add", "default", "via", gateway)
        in_router = ["ip", "netns", "exec", outer]
        run_command(*in_router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run_command(*in_router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        run_command(*in_router, "iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", *established)
        run_command(*in_router, "iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-j", "DROP")

    def route(self, name: str, subnet: str, via: str) -> None:
        """Route `subnet` (e.g. ``192.168.9.0/24``) from namespace `name` through `via` (an address on the bridge)."""
        run_command("ip", "-n", self.nodes[name], "route", "add", subnet, "via", via)

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[name]]

    def cut(self, name: str) -> None:
        run_command("ip", "-n", self.bridge, "link", "set", f"v-{name}", "down")

    def restore(self, name: str) -> None:
        run_command("ip", "-n", self.bridge, "link", "set", f"v-{name}", "up")

    def slow_down(self, name: str, ms: int) -> str:
        """Make the namespace's link slow: `ms` of netem delay on what it sends, or a 1 Mbit/s link without netem.

        Some kernels are built without netem (CONFIG_NET_SCH_NETEM unset, as on this project's CI machines);
        there a token bucket (tbf, always built) at 1 Mbit/s on both ends of the cable delays each request
        and answer of these tests (8 to 16 KiB) by 65 ms or more instead. Returns what was done.
        """
        netem = ["qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{ms}ms"]
        result = run_command("ip", "netns", "exec", self.nodes[name], "tc", *netem, check=False)
        if result.returncode == 0:
            return f"netem: {ms} ms more round-trip time"
        if "unknown" not in result.stderr:
            raise RuntimeError(f"tc netem failed: {result.stderr.strip()}")
        tbf = ["root", "tbf", "rate", "1mbit", "burst", "1600", "latency", "2s"]
        run_command("ip", "netns", "exec", self.nodes[name], "tc", "qdisc", "add", "dev", "eth0", *tbf)
        run_command("ip", "netns", "exec", self.bridge, "tc", "qdisc", "add", "dev", f"v-{name}", *tbf)
        return "no netem in this kernel: a 1 Mbit/s link (tbf) both ways"

    def cleanup(self) -> None:
        """Kill every process left in the namespaces (all started by this test), then delete them."""
        for namespace in [*self.nodes.values(), self.bridge]:
            pids = run_command("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for namespace in [*self.nodes.values(), self.bridge]:
            run_command("ip", "netns", "del", namespace, check=False)


class Process:
    """A process in a namespace; its output lines are collected by a thread."""

    def __init__(self, argv: list[str], log: Path):
        self.log_path = log
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()

    def wait_for_file(self, path: Path, timeout: float) -> str:
        """The text of `path` once this process has written it (its readiness signal); fails if it exits first."""
        deadline = time.monotonic() + timeout
        while not (path.exists() and (text := path.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {path.name} from {self.proc.args}:\n{''.join(self.lines)[-4000:]}")
            time.sleep(0.2)
        return text

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (if not sent yet), wait up to `timeout`, then SIGKILL the whole process group."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def build_nat_swarm(topology: Topology, public: str, home: str) -> None:
    """The namespaces of the NAT test and benchmark: on the bridge (`public` is a /24 prefix such as ``10.79.0``)
    ``dht`` at .1, ``client`` at .20 and ``public`` at .11; ``home`` at `home`.2 behind ``router`` (.2)."""
    topology.create()
    topology.add("dht", f"{public}.1")
    topology.add("client", f"{public}.20")
    topology.add("public", f"{public}.11")
    topology.add_behind_nat("home", "router", f"{public}.2", f"{home}.2")


def peer_argv(
    prefix: list[str], initial_peer: str, experts: str, hidden: int, endpoint_file: Path, *extra: str
) -> list[str]:
    """`dmoe peer` after `prefix` (a namespace's ``ip netns exec …`` and python) as the multi-host tests and
    benchmarks run it: on every interface, seeded, one compute thread, quick re-announcements, no replica
    averaging (it would send each expert's state over the links being measured); `extra` flags last."""
    return [
        *prefix,
        "-m",
        "dmoe_cli",
        "peer",
        "--initial-peers",
        initial_peer,
        "--host",
        "0.0.0.0",
        "--experts",
        experts,
        "--hidden-dim",
        str(hidden),
        "--seed",
        "0",
        "--compute-threads",
        "1",
        "--update-period",
        "5",
        "--expiration",
        "30",
        "--shutdown-grace",
        "1",
        "--sync-every",
        "0",
        "--endpoint-file",
        str(endpoint_file),
        *extra,
    ]


def driver_steps(driver: Process) -> list[dict]:
    """The step records `tests/swarm_driver.py` printed so far."""
    import json

    return [json.loads(line) for line in list(driver.lines) if line.startswith('{"step"')]


def wait_steps(driver: Process, count: int, timeout: float) -> list[dict]:
    """The driver's step records once there are `count` (fails if it exits or `timeout` passes first)."""
    deadline = time.monotonic() + timeout
    while len(driver_steps(driver)) < count:
        assert driver.proc.poll() is None and time.monotonic() < deadline, "".join(driver.lines)[-4000:]
        time.sleep(0.2)
    return driver_steps(driver)


def served(records: list[dict], endpoint: str) -> int:
    """Calls answered by `endpoint` in these step records."""
    return sum(record["served"].get(endpoint, 0) for record in records)


def driver_argv(prefix: list[str], initial_peer: str, num_experts: int, hidden: int, stop_file: Path) -> list[str]:
    """`tests/swarm_driver.py` (a training client printing one JSON line per step) after `prefix`, training over
    grid ``ffn.[0:num_experts]`` until `stop_file` exists."""
    driver = REPO / "tests" / "swarm_driver.py"
    args = ["--initial-peers", initial_peer, "--num-experts", str(num_experts), "--hidden-dim", str(hidden)]
    return [*prefix, str(driver), *args, "--stop-file", str(stop_file)]


def stop_all(processes: list[Process], grace: float = 20.0) -> None:
    """SIGTERM every process at once (each peer takes a moment to finish and save), then wait for them within
    `grace` seconds altogether and SIGKILL what is left."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in reversed(processes):
        process.stop(max(0.1, deadline - time.monotonic()))


def dht_argv(prefix: list[str], host: str, port: int, identity: Path, addr_file: Path) -> list[str]:
    """`dmoe dht` after `prefix`: a bootstrap node (and relay) at host:port whose fixed `identity` makes its
    multiaddr known in advance; it writes its multiaddrs to `addr_file` once it serves."""
    args = ["--host", host, "--port", str(port), "--identity", str(identity), "--addr-file", str(addr_file)]
    return [*prefix, "-m", "dmoe_cli", "dht", *args]
