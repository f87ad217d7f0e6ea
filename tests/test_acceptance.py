"""The issues' acceptance stories, run as a new user would: CLI processes and the example script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmoe_cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import REPO


@pytest.mark.slow
def test_training_script_survives_a_sigkilled_peer_within_its_timeouts(tmp_path):
    config = SwarmConfig(peers=4, experts_per_peer=2, replicas=2, hidden_dim=32, log_dir=str(tmp_path / "logs"))
    with LocalSwarm(config) as swarm:
        script = subprocess.Popen(
            [
                sys.executable,
                "-u",
                str(REPO / "examples" / "train_over_swarm.py"),
                "--initial-peers",
                *swarm.initial_peers,
                "--steps",
                "50",
                "--hidden-dim",
                "32",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        try:
            lines = []
            for line in script.stdout:
                lines.append(line)
                if line.startswith("step  25"):
                    swarm.kill_peer(0)
            assert script.wait(60) == 0, "".join(lines)
        finally:
            if script.poll() is None:
                script.kill()
    summary = json.loads(lines[-1])
    assert summary["max_step_seconds"] <= summary["step_limit_seconds"]
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["stats"].get("masked_tokens", 0) == 0, "two replicas per expert: no token is lost"


@pytest.mark.slow
def test_demo_command_finishes_and_the_loss_falls(tmp_path):
    result = subprocess.run(
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
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== loss" in result.stdout and "== done" in result.stdout
