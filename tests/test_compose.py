"""docker-compose.yml describes a working swarm: its services' commands and environment, run as local processes.

No Docker engine runs here, so the parity test plays the engine's part on 127.0.0.1: it reads the compose file and
the Dockerfile, and starts each service's entrypoint + command with the image's and the service's environment,
translated the way the containers would see the world:
  - the service name in a `/dns4/<service>/tcp/<port>` multiaddr becomes `localhost` (still a /dns4 address, so
    the libp2p daemon's name resolution is exercised), and the service's fixed port a free local one;
  - every replica of a scaled service gets its own free ports (DMOE_PORT, DMOE_DHT_PORT) instead of its own
    network namespace; 0.0.0.0 becomes 127.0.0.1 (nothing listens on the machine's real interfaces);
  - a named volume becomes a directory under tmp_path, shared by the replicas as the volume would be;
    the image's WORKDIR /app (where deploy/ is copied) is this repository;
  - readiness is each service's own `healthcheck` command, run with that service's environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dmoe_cli import healthcheck, slot
from tests.conftest import REPO, dies_with_test_run

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
APP_DIR = "/app"  # the image's WORKDIR: the repository's deploy/ is copied there
PORT_VARIABLES = ("DMOE_PORT", "DMOE_DHT_PORT")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@dataclass
class Image:
    """What the Dockerfile's final stage sets: entrypoint, default command, environment, workdir and user."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    user: str
    bases: list[str]
    text: str


def read_dockerfile() -> Image:
    text = DOCKERFILE.read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    # base images as built by default: the global ARGs' defaults in FROM lines, earlier stages left out
    defaults = {}
    for line in lines[: next(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))]:
        if line.upper().startswith("ARG ") and "=" in line:
            name, _, value = line[4:].strip().partition("=")
            defaults[name] = value
    bases, stages = [], set()
    for line in lines:
        words = line.split()
        if words[0].upper() == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda match: defaults[match.group(1)], words[1])
            if base not in stages:
                bases.append(base)
            if len(words) == 4 and words[2].upper() == "AS":
                stages.add(words[3])
    final = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) :]
    image = Image([], [], {}, "/", "root", bases, text)
    for line in final:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ENTRYPOINT":
            image.entrypoint = json.loads(rest)
        elif instruction == "CMD":
            image.cmd = json.loads(rest)
        elif instruction == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                image.env[key] = value
        elif instruction == "WORKDIR":
            image.workdir = rest.strip()
        elif instruction == "USER":
            image.user = rest.strip()
    return image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bootstrap_peer_id(compose: dict) -> tuple[str, str, int]:
    """(service name, peer id, port) of the bootstrap multiaddr the swarm's services are given."""
    maddrs = {
        value
        for service in compose["services"].values()
        for name, value in (service.get("environment") or {}).items()
        if name == "DMOE_INITIAL_PEERS"
    }
    assert len(maddrs) == 1, f"every service should join the same bootstrap node, got {maddrs}"
    match = re.fullmatch(r"/dns4/([\w-]+)/tcp/(\d+)/p2p/(\w+)", maddrs.pop())
    assert match, "DMOE_INITIAL_PEERS should be /dns4/<service>/tcp/<port>/p2p/<id>"
    return match.group(1), match.group(3), int(match.group(2))


# ---------------------------------------------------------------------------- the engine's part, locally


@dataclass
class LocalEngine:
    """Runs compose services as local processes (see the module docstring for the translation rules)."""

    compose: dict
    image: Image
    workdir: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (service, container port) -> local port
    processes: list[subprocess.Popen] = field(default_factory=list)

    def volume_dir(self, name: str) -> Path:
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def environment(self, service: str, *, replica: int = 0, overrides: dict | None = None) -> dict[str, str]:
        spec = self.compose["services"][service]
        mounts = {}
        for volume in spec.get("volumes", []):
            name, mount = volume.split(":")[:2]
            mounts[mount] = self.volume_dir(name)
        declared = {**self.image.env, **{k: str(v) for k, v in (spec.get("environment") or {}).items()}}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMOE_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for name, value in declared.items():
            if name == "PATH":
                continue
            if name in PORT_VARIABLES and value != "0":
                key = (service, int(value))
                if replica or key not in self.ports:
                    port = free_port()
                    self.ports.setdefault(key, port)
                else:
                    port = self.ports[key]
                value = str(port)
            env[name] = self.localize(value, mounts)
        env.update(overrides or {})
        return env

    def localize(self, value: str, mounts: dict[str, Path]) -> str:
        if value == "0.0.0.0":
            return "127.0.0.1"

        def dns(match: re.Match) -> str:
            service, port = match.group(1), int(match.group(2))
            assert service in self.compose["services"], f"{value} names no service"
            local = self.ports.get((service, port))
            assert local is not None, f"{value}: start service {service!r} first"
            return f"/dns4/localhost/tcp/{local}/"

        value = re.sub(r"/dns4/([\w-]+)/tcp/(\d+)/", dns, value)
        for mount, local_dir in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(local_dir) + value[len(mount) :]
        if value.startswith(APP_DIR + "/"):
            return str(REPO) + value[len(APP_DIR) :]
        return value

    def argv(self, service: str) -> list[str]:
        spec = self.compose["services"][service]
        entrypoint = spec.get("entrypoint", self.image.entrypoint)
        command = spec.get("command", self.image.cmd)
        return [sys.executable if part == "python" else part for part in [*entrypoint, *command]]

    def start(self, service: str, *, replica: int = 0, extra_args=(), overrides=None) -> tuple[subprocess.Popen, dict]:
        env = self.environment(service, replica=replica, overrides=overrides)
        with (
            open(self.workdir / f"{service}-{replica}.out", "wb") as out,
            open(self.workdir / f"{service}-{replica}.log", "wb") as log,
        ):
            proc = subprocess.Popen(
                [*self.argv(service), *extra_args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=True,
                preexec_fn=dies_with_test_run(),
            )
        self.processes.append(proc)
        return proc, env

    def log(self, service: str, replica: int = 0, suffix: str = "log") -> str:
        """What the process wrote to stderr (`suffix="out"`: to stdout)."""
        path = self.workdir / f"{service}-{replica}.{suffix}"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_healthy(self, service: str, env: dict, proc: subprocess.Popen, *, replica: int = 0, timeout=90):
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD", "healthchecks are exec-form lists"
        argv = [sys.executable if part == "python" else part for part in test[1:]]
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{service}[{replica}] exited:\n{self.log(service, replica)[-4000:]}"
            result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"{service}[{replica}] not healthy after {timeout} s: {result.stderr}\n"
                f"{self.log(service, replica)[-4000:]}"
            )
            time.sleep(1.0)

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 25
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes:  # the whole group: DHT daemons included
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def engine(tmp_path) -> Iterator[LocalEngine]:
    engine = LocalEngine(load_compose(), read_dockerfile(), tmp_path)
    try:
        yield engine
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- the file itself


def test_the_compose_file_has_a_bootstrap_node_scalable_peers_and_a_client():
    services = load_compose()["services"]
    assert {"dht", "peer", "client"} <= set(services)
    assert services["dht"]["command"][0] == "dht" and services["peer"]["command"][0] == "peer"
    assert services["client"]["command"][0] == "train"
    for name in ("peer", "client"):
        assert "container_name" not in services[name] and "ports" not in services[name], "would break --scale"
    assert services["peer"]["depends_on"]["dht"]["condition"] == "service_healthy"
    assert services["client"]["depends_on"]["peer"]["condition"] == "service_healthy"


def test_the_bootstrap_multiaddr_is_the_fixed_identity_of_the_dht_service():
    from hivemind.p2p import PeerID

    compose = load_compose()
    service, peer_id, port = bootstrap_peer_id(compose)
    dht = compose["services"][service]["environment"]
    assert service == "dht" and int(dht["DMOE_PORT"]) == port
    identity = dht["DMOE_IDENTITY"]
    assert identity.startswith(APP_DIR + "/deploy/"), "the identity file ships in the image"
    key_file = REPO / identity[len(APP_DIR) + 1 :]
    assert PeerID.from_identity(key_file.read_bytes()).to_base58() == peer_id


def test_every_dmoe_variable_is_a_flag_of_its_service_command(monkeypatch):
    from dmoe_cli.main import build_parser

    image = read_dockerfile()
    compose = load_compose()
    for name, spec in compose["services"].items():
        argv = [*spec.get("entrypoint", image.entrypoint), *spec.get("command", image.cmd)]
        command = argv[argv.index("dmoe") + 1 :]
        variables = {**image.env, **(spec.get("environment") or {})}
        for key in [k for k in os.environ if k.startswith("DMOE_")]:
            monkeypatch.delenv(key)
        for key, value in variables.items():
            if key.startswith("DMOE_"):
                monkeypatch.setenv(key, str(value).replace("{slot}", "0"))
        args = vars(build_parser().parse_args(command))  # parses the values too
        for key in spec.get("environment") or {}:  # (the image's DMOE_HOST is for the commands that listen)
            if key.startswith("DMOE_"):
                assert key[5:].lower() in args, f"{name}: {key} is no flag of `dmoe {command[0]}`"


def test_healthchecks_use_the_grpc_health_service_for_peers():
    services = load_compose()["services"]
    assert services["peer"]["healthcheck"]["test"] == ["CMD", "python", "-m", "dmoe_cli.healthcheck"]
    assert "--tcp" in services["dht"]["healthcheck"]["test"]
    from peer.servicer import SERVICE_NAME

    assert healthcheck.EXPERT_SERVICE == SERVICE_NAME


def test_peers_keep_checkpoints_in_a_named_volume_one_directory_each():
    compose = load_compose()
    peer = compose["services"]["peer"]
    volume, mount = peer["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"], "a named volume, declared at the top level"
    assert peer["environment"]["DMOE_CHECKPOINT_DIR"].startswith(mount + "/")
    assert "{slot}" in peer["environment"]["DMOE_CHECKPOINT_DIR"]
    assert peer["entrypoint"][:3] == ["python", "-m", "dmoe_cli.slot"]


def test_the_image_is_slim_cpu_only_unprivileged_with_dmoe_as_entry_point():
    image = read_dockerfile()
    assert all(re.fullmatch(r"python:[\w.]+-slim", base) for base in image.bases), image.bases
    assert "download.pytorch.org/whl/cpu" in image.text
    assert image.user not in ("root", "0", "")
    assert image.entrypoint == ["dmoe"]
    assert image.workdir == APP_DIR
    assert image.env.get("DMOE_HOST") == "0.0.0.0"
    assert re.search(r"COPY .*deploy/dht-identity\.key \./deploy/", image.text)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_image_also_builds_from_a_wheelhouse_on_another_base():
    image = read_dockerfile()
    assert re.search(r"^ARG BASE=python:[\w.]+-slim$", image.text, re.M), "BASE defaults to the official image"
    assert all(line.split()[1] in ("${BASE}", "deps") for line in image.text.splitlines() if line.startswith("FROM"))
    assert re.search(r"^ARG OFFLINE=0$", image.text, re.M) and "PIP_NO_INDEX=${OFFLINE}" in image.text
    assert "COPY deploy/ /deploy/" in image.text and "PIP_FIND_LINKS=/deploy/wheelhouse" in image.text
    assert "deploy/wheelhouse/" in (REPO / ".gitignore").read_text().split(), "the wheels never get committed"
    for script in ("base-image.sh", "wheelhouse.sh", "build-image-offline.sh"):
        path = REPO / "deploy" / script
        assert os.access(path, os.X_OK), f"{path} is executable"
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, f"{script} parses"


def test_slots_give_concurrent_replicas_distinct_directories_and_free_them_on_exit(tmp_path):
    template = str(tmp_path / "data" / "peer-{slot}")
    first, first_dir, first_fd = slot.claim_slot(template)
    second, second_dir, second_fd = slot.claim_slot(template)
    assert (first, second) == (0, 1) and first_dir != second_dir and first_dir.is_dir()
    os.close(first_fd)
    again, again_dir, again_fd = slot.claim_slot(template)
    assert again == 0 and again_dir == first_dir, "a restarted replica takes over the freed directory"
    os.close(second_fd)
    os.close(again_fd)


def test_the_slot_launcher_execs_its_command_with_the_claimed_directory(tmp_path):
    env = {**os.environ, "DMOE_CHECKPOINT_DIR": str(tmp_path / "peer-{slot}")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmoe_cli.slot",
            sys.executable,
            "-c",
            "import os; print(os.environ['DMOE_CHECKPOINT_DIR'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "peer-0")


def test_the_slot_stays_taken_while_the_execd_command_runs(tmp_path):
    template = str(tmp_path / "peer-{slot}")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmoe_cli.slot",
            sys.executable,
            "-c",
            "import time; print('up', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "DMOE_CHECKPOINT_DIR": template},
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout.readline().strip() == "up"
        taken, _, fd = slot.claim_slot(template)
        assert taken == 1, "the exec'd command holds slot 0"
        os.close(fd)
    finally:
        child.kill()
        child.wait(10)
    free, _, fd = slot.claim_slot(template)
    assert free == 0, "its slot is free once it has exited"
    os.close(fd)


def test_the_healthcheck_reports_a_serving_peer_and_a_closed_port(peer):
    assert healthcheck.main([peer.endpoint]) == 0
    assert healthcheck.main(["--tcp", peer.endpoint]) == 0
    closed = f"127.0.0.1:{free_port()}"
    assert healthcheck.main(["--timeout", "1", closed]) == 1
    assert healthcheck.main(["--tcp", "--timeout", "1", closed]) == 1


# ---------------------------------------------------------------------------- the parity test


@pytest.mark.slow
def test_the_compose_services_run_as_processes_form_a_working_swarm(engine, tmp_path):
    dht, dht_env = engine.start("dht")
    engine.wait_healthy("dht", dht_env, dht)

    peers = [engine.start("peer", replica=i) for i in range(3)]
    for i, (proc, env) in enumerate(peers):
        engine.wait_healthy("peer", env, proc, replica=i)

    status_env = engine.environment("client")
    status = subprocess.run(
        [*engine.argv("client")[:1], "status", "--json"],
        env=status_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    experts = json.loads(status.stdout)["experts"]
    peer_ports = {env["DMOE_PORT"] for _, env in peers}
    assert sorted(experts) == [f"ffn.{i}" for i in range(8)]
    for uid, replicas in experts.items():
        endpoints = {r["endpoint"] for r in replicas}
        assert {e.rsplit(":", 1)[1] for e in endpoints} == peer_ports, f"{uid} is on every peer: {endpoints}"
        assert all(not e.startswith("0.0.0.0") for e in endpoints)

    steps = 6
    client, _ = engine.start(
        "client",
        extra_args=["--json"],
        overrides={
            "DMOE_STEPS": str(steps),
            "DMOE_EVAL_EVERY": "0",
            "DMOE_SAMPLE_CHARS": "0",
            "DMOE_MAX_CORPUS_BYTES": "300000",
        },
    )
    assert client.wait(180) == 0, engine.log("client")[-4000:]
    output = engine.log("client", suffix="out")
    summary = json.loads(output[output.index("{") :])
    assert summary["steps"] == steps and summary["failed_steps"] == 0, summary
    assert (engine.volume_dir("client-checkpoints") / "client.pt").exists()

    for proc, _ in peers:  # a graceful stop writes every expert's checkpoint
        os.killpg(proc.pid, signal.SIGTERM)
    for i, (proc, _) in enumerate(peers):
        assert proc.wait(30) == 0, engine.log("peer", i)[-3000:]
    volume = engine.volume_dir("peer-checkpoints")
    slots = sorted(path.name for path in volume.iterdir())
    assert slots == ["peer-0", "peer-1", "peer-2"], "each replica claimed its own directory"
    for name in slots:
        latest = [path for path in (volume / name).glob("ffn.*.ckpt") if not path.name.endswith(".prev.ckpt")]
        assert len(latest) == 8, f"{name} holds a checkpoint of each of the 8 experts: {latest}"
