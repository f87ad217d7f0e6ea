"""docker-compose.yml under a real Docker engine: the image, the container network, health checks, volumes, --scale.

tests/test_compose.py runs the services' commands as local processes; this test builds the image the way a site
without registry access would (deploy/build-image-offline.sh: a Debian base image made with debootstrap and a
wheelhouse, both cached under /var/cache/dmoe and in the engine's store) and runs the swarm as containers with
Debian's `docker.io` engine and `docker-compose` 1.29. It starts `dockerd` when none answers (and stops what it
started), and skips only where no engine can be started (no `dockerd`, `docker-compose`, or root).

A compose override file (under tmp_path) only lets the client train for long enough and write its per-step log
to its volume, and lets each peer write its endpoint file inside its own container; everything else is the
file as users run it, under a project name of its own.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, dies_with_test_run

COMPOSE_FILE = REPO / "docker-compose.yml"
IMAGE = "dmoe:latest"  # what docker-compose.yml runs
EXPERTS = [f"ffn.{i}" for i in range(8)]  # the peers' DMOE_EXPERTS
PEER_PORT = 31330
ENDPOINT_FILE = "/tmp/dmoe-peer.json"  # inside each peer container
TRAINING_LOG = "/data/train.csv"  # in the client's volume
# Asks the peer in this container for its experts' update counts over its own gRPC Info method.
UPDATE_COUNTS = (
    "import grpc, json\n"
    "from proto import Method, decode_info_response, encode_info_request\n"
    f"with grpc.insecure_channel('127.0.0.1:{PEER_PORT}') as channel:\n"
    "    raw = channel.unary_unary(Method.INFO.path)(encode_info_request(''), timeout=20)\n"
    "print(json.dumps({status.uid: status.update_count for status in decode_info_response(raw)[0]}))\n"
)


def docker_client() -> str | None:
    """Debian's docker.io client first: another `docker` earlier on PATH may not match the engine."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")


def engine_answers(docker: str) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> Iterator[str]:
    """The docker client, talking to a running engine: this machine's, or a `dockerd` started (and stopped) here."""
    client, dockerd, compose = docker_client(), shutil.which("dockerd"), shutil.which("docker-compose")
    if client is None or dockerd is None:
        pytest.skip("no Docker engine here: apt-get install docker.io (see .ci/run)")
    if compose is None:
        pytest.skip("no docker-compose here: apt-get install docker-compose (see .ci/run)")
    if engine_answers(client):
        yield client
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine runs and dockerd needs root to start")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log:
        engine = subprocess.Popen(
            [dockerd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=dies_with_test_run(),
        )
    try:
        deadline = time.monotonic() + 90
        while not engine_answers(client):
            if engine.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd cannot start here: {log_path.read_text(errors='replace')[-1500:]}")
            time.sleep(1)
        yield client
    finally:
        engine.terminate()  # dockerd stops its containers and its containerd
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(engine.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        engine.wait(10)


@pytest.fixture(scope="module")
def figures() -> dict[str, float]:
    """What the test measured, printed at its end (see the issue's list of figures)."""
    return {}


@pytest.fixture(scope="module")
def image(docker, figures) -> str:
    """`dmoe:latest`, built offline: base image and wheelhouse from their caches (built when absent)."""
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "deploy" / "build-image-offline.sh"), IMAGE],
        cwd=REPO,
        env={**os.environ, "DOCKER": docker},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, f"the offline image build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    figures["image build s"] = round(time.monotonic() - started, 1)
    size = subprocess.run([docker, "image", "inspect", "--format", "{{.Size}}", IMAGE], capture_output=True, text=True)
    figures["image MB"] = round(int(size.stdout) / 1e6)
    return IMAGE


@dataclass
class Compose:
    """One compose project of docker-compose.yml (plus the test's override file), driven through the CLI."""

    docker: str
    project: str
    override: Path

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert not check or result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).stdout.split()

    def inspect(self, container: str) -> dict:
        result = subprocess.run([self.docker, "inspect", container], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0]

    def running(self, service: str) -> dict[str, dict]:
        """The service's running containers: id -> `docker inspect` record."""
        records = {c: self.inspect(c) for c in self.containers(service)}
        return {c: r for c, r in records.items() if r["State"]["Running"]}

    def address(self, record: dict) -> str:
        (network,) = record["NetworkSettings"]["Networks"].values()
        return network["IPAddress"]

    def exec(self, container: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.docker, "exec", container, *argv], capture_output=True, text=True, timeout=timeout)

    def wait_healthy(self, service: str, replicas: int, timeout: float) -> dict[str, dict]:
        """Wait until `replicas` containers of `service` run and Docker reports each healthy."""
        deadline = time.monotonic() + timeout
        while True:
            running = self.running(service)
            health = {c: r["State"].get("Health", {}).get("Status") for c, r in running.items()}
            if len(running) == replicas and all(status == "healthy" for status in health.values()):
                return running
            assert time.monotonic() < deadline, f"{service}: not {replicas} healthy after {timeout} s: {health}"
            time.sleep(2)

    def status(self, client: str) -> dict[str, set[str]]:
        """`dmoe status --json` inside the client container: uid -> the endpoints of its replicas."""
        result = self.exec(client, "dmoe", "status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        experts = json.loads(result.stdout)["experts"]
        return {uid: {replica["endpoint"] for replica in replicas} for uid, replicas in experts.items()}

    def wait_announced(self, client: str, addresses: set[str], timeout: float) -> None:
        """Wait until every expert is listed on exactly the peers at `addresses` (stale records expire)."""
        wanted = {f"{address}:{PEER_PORT}" for address in addresses}
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(client)
            if sorted(status) == EXPERTS and all(endpoints == wanted for endpoints in status.values()):
                return
            assert time.monotonic() < deadline, f"not every expert on {sorted(wanted)} after {timeout} s: {status}"
            time.sleep(3)

    def training_log(self, client: str) -> list[tuple[int, float, float]]:
        """(step, loss, elapsed seconds) of every step the client logged so far."""
        result = self.exec(client, "cat", TRAINING_LOG)
        if result.returncode != 0:
            return []
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        return [(int(row["step"]), float(row["loss"]), float(row["elapsed"])) for row in rows if row.get("elapsed")]

    def wait_steps(self, client: str, steps: int, timeout: float) -> list[tuple[int, float, float]]:
        """Wait until the client has logged `steps` steps; fails if its container stops first."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.training_log(client)
            if len(rows) >= steps:
                return rows
            assert self.inspect(client)["State"]["Running"], f"the client stopped:\n{self.logs('client')}"
            assert time.monotonic() < deadline, (
                f"{len(rows)} of {steps} steps after {timeout} s:\n{self.logs('client')}"
            )
            time.sleep(2)

    def update_counts(self, container: str) -> dict[str, int]:
        result = self.exec(container, "python", "-c", UPDATE_COUNTS)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def endpoint_file(self, container: str, timeout: float) -> dict:
        """The endpoint file the peer in `container` writes once it serves."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.exec(container, "cat", ENDPOINT_FILE)
            if result.returncode == 0 and result.stdout.strip():
                return json.loads(result.stdout)
            assert time.monotonic() < deadline, f"no {ENDPOINT_FILE} in {container} after {timeout} s"
            time.sleep(2)

    def logs(self, service: str = "", tail: int = 40) -> str:
        result = self.run("logs", "--no-color", "--tail", str(tail), *([service] if service else []), check=False)
        return result.stdout[-6000:]


@pytest.fixture
def compose(docker, image, tmp_path) -> Iterator[Compose]:
    """A compose project of its own; `down -v` at the end, whatever happened."""
    override = tmp_path / "docker-compose.test.yml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "peer": {"environment": {"DMOE_ENDPOINT_FILE": ENDPOINT_FILE}},
                    "client": {
                        "environment": {
                            "DMOE_STEPS": "1000000",  # trains until the test stops it
                            "DMOE_LOG_CSV": TRAINING_LOG,
                            "DMOE_EVAL_EVERY": "0",
                            "DMOE_SAMPLE_CHARS": "0",
                            "DMOE_MAX_CORPUS_BYTES": "300000",
                        }
                    },
                }
            }
        )
    )
    project = Compose(docker, f"dmoetest{os.getpid()}", override)
    try:
        yield project
    finally:
        (tmp_path / "compose.log").write_text(project.logs(tail=200))
        project.run("down", "-v", "--remove-orphans", "-t", "30", timeout=300, check=False)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # a clean machine also runs debootstrap and fills the wheelhouse first
def test_the_compose_swarm_runs_trains_survives_a_kill_scales_and_resumes_under_docker(compose, figures):
    started = time.monotonic()
    compose.run("up", "-d", "--scale", "peer=3", timeout=600)  # returns once dht and peers are healthy
    compose.wait_healthy("dht", 1, timeout=60)
    peers = compose.wait_healthy("peer", 3, timeout=180)
    figures["healthy swarm s"] = round(time.monotonic() - started, 1)
    ps = compose.run("ps").stdout
    assert ps.count("(healthy)") == 4, ps
    print(ps)

    (client,) = compose.containers("client")
    compose.wait_announced(client, {compose.address(record) for record in peers.values()}, timeout=60)

    rows = compose.wait_steps(client, 60, timeout=300)
    losses = [loss for _, loss, _ in rows]
    assert mean(losses[-10:]) < mean(losses[:10]) - 0.5, f"the loss does not fall: {losses}"
    (_, _, t0), (_, _, t1) = rows[10], rows[59]
    figures["container steps/s"] = round(49 / (t1 - t0), 2)

    victim = next(iter(peers))
    subprocess.run([compose.docker, "kill", victim], check=True, capture_output=True, timeout=60)
    killed_at = len(rows)
    rows = compose.wait_steps(client, killed_at + 40, timeout=300)
    after_kill = [loss for _, loss, _ in rows[killed_at:]]
    assert mean(after_kill[-10:]) < mean(losses[:10]) - 0.5, f"training did not go on after the kill: {after_kill}"
    assert [step for step, _, _ in rows] == sorted({step for step, _, _ in rows}), "steps go on, one after another"

    compose.run("up", "-d", "--no-deps", "--no-recreate", "--scale", "peer=4", "peer", timeout=300)
    scaled = compose.wait_healthy("peer", 4, timeout=240)
    assert set(peers) <= set(scaled) and len(set(scaled) - set(peers)) == 1, "the killed one is back, one is new"
    compose.wait_announced(client, {compose.address(record) for record in scaled.values()}, timeout=120)

    compose.run("stop", "client", timeout=120)  # no more updates: the counts stay put until the restart
    before = {container: compose.update_counts(container) for container in scaled}
    assert all(sorted(counts) == EXPERTS for counts in before.values()), before
    assert all(count > 0 for counts in before.values() for count in counts.values()), f"no training? {before}"
    compose.run("restart", "peer", timeout=300)  # SIGTERM: every peer checkpoints into its slot of the volume
    restarted = compose.wait_healthy("peer", 4, timeout=240)
    assert set(restarted) == set(scaled)
    for container in restarted:
        resumed = compose.endpoint_file(container, timeout=60)["resumed"]
        for uid in EXPERTS:
            lowest, highest = min(c[uid] for c in before.values()), max(c[uid] for c in before.values())
            # the replicas' periodic averaging only ever raises a count to the replicas' highest
            assert resumed[uid] is not None and lowest <= resumed[uid] <= highest, (uid, resumed, before)

    compose.run("down", "-v", timeout=300)
    volumes = subprocess.run(
        [compose.docker, "volume", "ls", "-q", "--filter", f"name={compose.project}"], capture_output=True, text=True
    )
    assert volumes.stdout.split() == [], "down -v drops the volumes"
    print("figures:", json.dumps(figures))
