"""The issues' acceptance stories, run as a new user would: CLI processes and the example script."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from dmoe_cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import REPO

KILL_AT_STEP = 25  # peer 0 is SIGKILLed once the script reports this step
STEPS = 50


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.slow
def test_training_script_survives_a_sigkilled_peer_within_its_timeouts(tmp_path):
    config = SwarmConfig(peers=4, experts_per_peer=2, replicas=2, hidden_dim=32, log_dir=str(tmp_path / "logs"))
    with LocalSwarm(config) as swarm:
        victim = swarm.peer_processes[0]
        script = subprocess.Popen(
            [
                sys.executable,
                "-u",
                str(REPO / "examples" / "train_over_swarm.py"),
                "--initial-peers",
                *swarm.initial_peers,
                "--steps",
                str(STEPS),
                "--hidden-dim",
                "32",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            start_new_session=True,  # the script and its DHT process: one group, killed together below
        )
        output: list[str] = []
        records: list[dict] = []
        killed_after: int | None = None
        try:
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_read_lines, args=(script.stdout, lines), daemon=True).start()
            deadline = time.monotonic() + 180
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail("the script did not finish in time:\n" + "".join(output))
                if line is None:
                    break
                output.append(line)
                if line.startswith("{"):
                    records.append(json.loads(line))
                step = records[-1].get("step", -1) if records else -1
                if killed_after is None and step >= KILL_AT_STEP:
                    swarm.kill_peer(0)  # returns once the peer process has exited
                    killed_after = step
            assert script.wait(60) == 0, "".join(output)
        finally:
            if script.poll() is None:
                os.killpg(script.pid, signal.SIGKILL)
                script.wait(10)
        assert killed_after is not None, f"no step {KILL_AT_STEP} reported:\n" + "".join(output)
        assert victim.poll() is not None, "the killed peer is still running"

    steps = [record["step"] for record in records if "step" in record]
    assert steps == list(range(STEPS)), "one record per step, in order"
    assert len([step for step in steps if step > killed_after]) >= STEPS - KILL_AT_STEP - 5, "steps went on"
    summary = records[-1]
    assert summary["steps"] == STEPS
    assert summary["max_step_seconds"] <= summary["step_limit_seconds"]
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["stats"].get("masked_tokens", 0) == 0, "two replicas per expert: no token is lost"


@pytest.mark.slow
def test_demo_command_finishes_and_the_loss_falls(tmp_path):
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmoe_cli",
            "demo",
            "--steps",
            "40",
            "--peers",
            "2",
            "--experts-per-peer",
            "2",
            "--samples",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # the demo, its swarm and their DHT processes: one group, killed together below
    )
    try:
        stdout, stderr = demo.communicate(timeout=240)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate(timeout=10)
    assert demo.returncode == 0, stdout + stderr
    assert "== loss" in stdout and "== done" in stdout
