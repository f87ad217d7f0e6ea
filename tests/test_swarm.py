"""`dmoe swarm`: experts spread over distinct peers, a real local swarm that serves them, and no orphans ever."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmoe_cli.swarm import LocalSwarm, SwarmConfig, assign_experts
from tests.conftest import DMOE, REPO, kill_process_group, start_in_group

# --- /proc helpers: the whole process tree, so that grandchildren (DHT daemons) are checked too ---


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def descendants(root: int) -> set[int]:
    """Every live process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group_members(pgid: int) -> set[int]:
    """Every live process whose process group is `pgid`."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.add(int(entry.name))
    return members


def running(pids: set[int]) -> set[int]:
    """The pids that still run (zombies count as gone: they are dead, just not reaped by init yet)."""
    return {pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] not in ("Z", "X")}


def _shm_managers(pids: set[int]) -> set[int]:
    """torch_shm_manager daemons: hivemind shares memory through them; they detach and exit once unused."""
    found = set()
    for pid in pids:
        try:
            if b"torch_shm_manager" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


def _describe(pids: set[int]) -> list[str]:
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            return "?"

    return [f"{pid} {_stat(pid)} {cmdline(pid)}" for pid in sorted(pids)]


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running(pids)


def kill_all(pids: set[int]) -> None:
    for pid in running(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- assign_experts ---


@pytest.mark.parametrize(
    "peers, per_peer, replicas", [(1, 1, 1), (4, 2, 1), (3, 2, 2), (3, 2, 3), (5, 3, 5), (6, 4, 3), (4, 3, 2)]
)
def test_every_expert_has_its_replicas_on_different_peers(peers, per_peer, replicas):
    hosted = assign_experts(peers, per_peer, replicas, "ffn")
    assert len(hosted) == peers and all(len(uids) == per_peer for uids in hosted)
    assert all(len(set(uids)) == len(uids) for uids in hosted), "a peer hosts an expert twice"
    count = peers * per_peer // replicas
    hosts = {f"ffn.{i}": sum(f"ffn.{i}" in uids for uids in hosted) for i in range(count)}
    assert hosts == {f"ffn.{i}": replicas for i in range(count)}


@pytest.mark.parametrize("peers, per_peer, replicas", [(4, 2, 2), (3, 2, 2), (6, 4, 3), (5, 2, 2), (8, 4, 2)])
def test_no_two_experts_share_the_same_set_of_peers(peers, per_peer, replicas):
    hosted = assign_experts(peers, per_peer, replicas, "ffn")
    peer_sets = {}
    for peer, uids in enumerate(hosted):
        for uid in uids:
            peer_sets.setdefault(uid, set()).add(peer)
    sets = [frozenset(s) for s in peer_sets.values()]
    assert len(set(sets)) == len(sets), f"two experts on the same peers: {peer_sets}"


def test_two_peers_down_take_out_at_most_one_expert_and_the_prefix_is_used():
    hosted = assign_experts(4, 2, 2, "moe.layer")
    assert sorted(uid for uids in hosted for uid in uids) == sorted(f"moe.layer.{i}" for i in range(4) for _ in "ab")
    for down in itertools.combinations(range(4), 2):
        alive = {uid for peer, uids in enumerate(hosted) if peer not in down for uid in uids}
        assert len(alive) >= 3, f"peers {down} down leave only {sorted(alive)}"
    assert assign_experts(2, 2, 1, "ffn") == [["ffn.0", "ffn.2"], ["ffn.1", "ffn.3"]]


@pytest.mark.parametrize(
    "peers, per_peer, replicas, message",
    [
        (3, 1, 2, "divisible"),
        (2, 2, 3, "must not exceed peers"),
        (0, 2, 1, "peers must be at least 1"),
        (2, 0, 1, "experts_per_peer"),
        (2, 2, 0, "replicas"),
    ],
)
def test_impossible_assignments_are_refused_clearly(peers, per_peer, replicas, message):
    with pytest.raises(ValueError, match=message):
        assign_experts(peers, per_peer, replicas, "ffn")


# --- a real swarm ---


@pytest.fixture
def swarm(tmp_path) -> Iterator[LocalSwarm]:
    config = SwarmConfig(peers=3, experts_per_peer=2, replicas=2, hidden_dim=16, log_dir=str(tmp_path / "logs"))
    with LocalSwarm(config) as swarm:
        yield swarm


def _serving(endpoint: str) -> bool:
    with grpc.insecure_channel(endpoint) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _hosted_uids(endpoint: str) -> list[str]:
    from proto import expert_pb2, expert_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        reply = expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)
        return sorted(expert.uid for expert in reply.experts)


def _check_replicas(swarm: LocalSwarm) -> None:
    replicas = {uid: 0 for uid in swarm.uids}
    for endpoint, assigned in zip(swarm.peer_endpoints, swarm.assignments, strict=True):
        assert _serving(endpoint), endpoint
        assert _hosted_uids(endpoint) == assigned
        for uid in assigned:
            replicas[uid] += 1
    assert replicas == {"ffn.0": 2, "ffn.1": 2, "ffn.2": 2}


@pytest.mark.slow
def test_a_swarm_serves_every_expert_twice_survives_a_restart_and_leaves_no_process_behind(swarm):
    assert swarm.uids == ["ffn.0", "ffn.1", "ffn.2"]
    assert swarm.initial_peers and all(maddr.startswith("/") for maddr in swarm.initial_peers)
    _check_replicas(swarm)
    assert "peer serving" in swarm.peer_log(0).read_text()
    for index, info in enumerate(swarm.peer_info):  # what each peer's endpoint file said when it was ready
        assert info["pid"] == swarm.peer_processes[index].pid and info["endpoint"] == swarm.peer_endpoints[index]
        assert info["experts"] == swarm.assignments[index] and info["dht_maddrs"] and info["peer_id"]
        assert info["resumed"] == {uid: None for uid in swarm.assignments[index]}, "no checkpoints: a fresh start"

    killed = swarm.peer_processes[1].pid
    group = descendants(killed) | {killed}
    swarm.kill_peer(1)
    assert swarm.peer_endpoints[1] is None
    left = wait_gone(group - _shm_managers(group), 5)
    assert not left, f"SIGKILL takes the peer's whole process group down: {_describe(left)}"
    swarm.restart_peer(1)
    assert swarm.peer_processes[1].pid != killed
    assert swarm.peer_info[1]["pid"] == swarm.peer_processes[1].pid, "the new run's file, not the killed one's"
    _check_replicas(swarm)

    tree = descendants(os.getpid())
    assert {p.pid for p in swarm.processes} <= tree
    try:
        swarm.stop()
        assert all(p.poll() is not None for p in swarm.processes)
        assert not any(swarm.peer_endpoint_file(i).exists() for i in range(3)), "a clean stop removes the files"
        assert not running(tree - _shm_managers(tree)), f"left after stop(): {_describe(running(tree))}"
        assert not wait_gone(tree | group, 10), f"left after stop(): {_describe(running(tree | group))}"
        swarm.stop()  # idempotent
    finally:
        kill_all(tree)


@pytest.mark.slow
def test_a_peer_that_cannot_start_is_reported_with_its_output(tmp_path):
    config = SwarmConfig(
        peers=1,
        experts_per_peer=1,
        hidden_dim=8,
        extra_peer_args=["--no-such-flag"],
        log_dir=str(tmp_path),
        startup_timeout=60,
    )
    swarm = LocalSwarm(config)
    try:
        with pytest.raises(RuntimeError, match="(?s)peer 0 exited.*--no-such-flag"):
            swarm.start()
        assert not any(p.poll() is None for p in swarm.processes)
    finally:
        swarm.stop()


# --- the `dmoe swarm` command ---


@contextmanager
def swarm_command(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, list[str], set[int]]]:
    """A `dmoe swarm` process in its own process group, returned once its `--addr-file` says the swarm is ready
    and it printed how to connect; its group, and every process below it, die at teardown."""
    addr_file = tmp_path / "dht.txt"
    command = [
        *DMOE,
        "swarm",
        "--peers",
        "2",
        "--experts-per-peer",
        "1",
        "--hidden-dim",
        "8",
        "--addr-file",
        str(addr_file),
        "--log-dir",
        str(tmp_path / "logs"),
        *args,
    ]
    proc = start_in_group(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[str] = []
    printed = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Ctrl-C"):
                printed.set()
        printed.set()

    threading.Thread(target=read, daemon=True).start()
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while not addr_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert addr_file.exists() and proc.poll() is None, "dmoe swarm did not start:\n" + "".join(output)
        assert printed.wait(30), "dmoe swarm printed no summary:\n" + "".join(output)
        tree = descendants(proc.pid)
        yield proc, output, tree
    finally:
        tree |= descendants(proc.pid)
        kill_process_group(proc)
        kill_all(tree)


@pytest.mark.slow
def test_sigterm_stops_the_swarm_command_and_all_its_children(tmp_path):
    with swarm_command(tmp_path) as (proc, output, tree):
        text = "".join(output)
        maddr = (tmp_path / "dht.txt").read_text().splitlines()[0]
        assert f"dmoe status --initial-peers {maddr}" in text
        assert "RemoteMixtureOfExperts(" in text and "2 peers serving 2 experts" in text
        assert len(tree) >= 3, "a DHT node and two peers"

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(25) == 0
        assert not wait_gone(tree, 25 - (time.monotonic() - started)), "children outlived the swarm"
        assert "swarm stopped" in "".join(output)


@pytest.mark.slow
def test_sigkill_of_the_swarm_command_leaves_no_orphans(tmp_path):
    with swarm_command(tmp_path, "--peers", "1") as (proc, _output, tree):
        assert len(tree) >= 2, "a DHT node and a peer"
        proc.kill()
        proc.wait(10)
        assert not wait_gone(tree, 30), "orphans outlived the SIGKILLed swarm"


# --- the fixtures themselves ---

# A peer whose custom module starts a helper process that, unlike the DHT daemons, does not end with the peer:
# only killing the peer's whole process group ends it.
STUBBORN_MODULE = """
import subprocess
subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""

FAILING_TEST = """
import json, os
from pathlib import Path

from tests.conftest import PeerProcess
from tests.test_swarm import descendants


def test_that_fails_while_a_peer_runs(peer_processes):
    module = os.environ["DMOE_TEST_MODULE"]
    process = PeerProcess(["--experts", "ffn.0", "--hidden-dim", "8", "--custom-module", module])
    peer_processes.append(process)
    pid = process.proc.pid
    Path(os.environ["DMOE_TEST_RECORD"]).write_text(json.dumps({"pid": pid, "below": sorted(descendants(pid))}))
    assert False, "fails on purpose"
"""


@pytest.mark.slow
def test_a_failing_test_leaves_no_process_of_its_peer_behind(tmp_path):
    test_file, record, module = tmp_path / "test_fails.py", tmp_path / "record.json", tmp_path / "stubborn.py"
    test_file.write_text(FAILING_TEST)
    module.write_text(STUBBORN_MODULE)
    run = subprocess.run(
        [*DMOE[:1], "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(test_file)],
        cwd=REPO,
        env={**os.environ, "DMOE_TEST_RECORD": str(record), "DMOE_TEST_MODULE": str(module)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1 and "fails on purpose" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    started = json.loads(record.read_text())
    assert len(started["below"]) >= 2, "the peer had started its DHT daemon and the stubborn helper"
    pids = {started["pid"], *started["below"]}
    left = wait_gone(pids - _shm_managers(pids), 10) | group_members(started["pid"])
    try:
        assert not left, f"outlived the failing test: {_describe(left)}"
    finally:
        kill_all(left)
