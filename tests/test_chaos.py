"""Chaos mode: `dmoe swarm --chaos-kill-every S --chaos-restart` SIGKILLs peers while a client trains.

Training must not notice (no failed step), and every restarted peer must carry on from the update counts its
experts' checkpoints held when it was killed.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from dmoe_cli.chaos import ChaosEvent, prepare_chaos
from dmoe_cli.main import build_parser, main
from dmoe_cli.swarm import SwarmConfig
from tests.conftest import REPO

DMOE = [sys.executable, "-m", "dmoe_cli"]
KILL = re.compile(r"^chaos \+[\d.]+s: SIGKILL peer (\d+) \(pid (\d+); ([^)]*)\); checkpoints hold (.*)$", re.M)
RESTART = re.compile(
    r"^chaos \+[\d.]+s: restarted peer (\d+) \(pid (\d+)\) at (\S+) in [\d.]+ s; resumed (.*) \((.*)\)$", re.M
)


def _counts(text: str) -> dict[str, int | None]:
    pairs = (item.split("=") for item in text.split())
    return {uid: None if count == "none" else int(count) for uid, count in pairs}


# ---------------------------------------------------------------------------- settings


def test_chaos_restart_without_an_interval_is_refused_with_one_line(tmp_path, capsys):
    assert main(["swarm", "--chaos-restart", "--log-dir", str(tmp_path)]) == 2
    assert "--chaos-restart needs --chaos-kill-every" in capsys.readouterr().err


def test_chaos_restart_gets_checkpoints_saved_every_half_interval_by_default(tmp_path):
    config = SwarmConfig(chaos_kill_every=5, chaos_restart=True)
    line = prepare_chaos(config, tmp_path)
    assert config.checkpoint_dir == str(tmp_path / "checkpoints") and config.checkpoint_every == 2.5
    assert "every 5 s" in line and "restarted" in line
    mine = SwarmConfig(chaos_kill_every=5, chaos_restart=True, checkpoint_dir="/x", checkpoint_every=9)
    prepare_chaos(mine, tmp_path)
    assert (mine.checkpoint_dir, mine.checkpoint_every) == ("/x", 9)


def test_chaos_flags_are_also_environment_variables(monkeypatch):
    monkeypatch.setenv("DMOE_CHAOS_KILL_EVERY", "7.5")
    monkeypatch.setenv("DMOE_CHAOS_RESTART", "true")
    args = build_parser().parse_args(["swarm"])
    assert (args.chaos_kill_every, args.chaos_restart) == (7.5, True)
    assert build_parser().parse_args(["demo", "--chaos"]).chaos is True


def test_a_restart_event_compares_what_was_resumed_with_the_checkpoints_at_the_kill():
    kill = ChaosEvent("kill", 2, 5.0, ["ffn.1", "ffn.3"], pid=42, update_counts={"ffn.1": 12, "ffn.3": None})
    assert kill.describe() == "chaos +5.0s: SIGKILL peer 2 (pid 42; ffn.1 ffn.3); checkpoints hold ffn.1=12 ffn.3=none"
    good = ChaosEvent(
        "restart",
        2,
        9.0,
        kill.uids,
        pid=43,
        endpoint="127.0.0.1:1",
        seconds=4.0,
        update_counts={"ffn.1": 12, "ffn.3": 0},
        checkpointed=kill.update_counts,
    )
    assert good.resumed_as_checkpointed and "(as checkpointed)" in good.describe()
    bad = ChaosEvent(
        "restart",
        2,
        9.0,
        kill.uids,
        pid=43,
        endpoint="127.0.0.1:1",
        seconds=4.0,
        update_counts={"ffn.1": 0, "ffn.3": 0},
        checkpointed=kill.update_counts,
    )
    assert not bad.resumed_as_checkpointed and "MISMATCH" in bad.describe()


# ---------------------------------------------------------------------------- a real chaotic swarm


class _Reader:
    """Collects a process's output lines in a thread; `wait_for(text)` blocks until a line contains it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._event = proc, [], threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._event.set()
        self._event.set()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return needle in self.text
            self._event.wait(0.5)
            self._event.clear()
        return True


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> int | None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # its children get SIGTERM through PR_SET_PDEATHSIG (see dmoe_cli.swarm)
        proc.wait(10)
        return None


@pytest.mark.slow
def test_training_survives_sigkilled_peers_and_restarted_peers_resume_their_checkpointed_counts(tmp_path):
    seconds, interval = 30, 5
    checkpoints = tmp_path / "checkpoints"
    swarm = subprocess.Popen(
        [
            *DMOE,
            "swarm",
            "--peers",
            "4",
            "--experts-per-peer",
            "2",
            "--replicas",
            "2",
            "--hidden-dim",
            "32",
            "--chaos-kill-every",
            str(interval),
            "--chaos-restart",
            "--chaos-seed",
            "1",
            "--checkpoint-dir",
            str(checkpoints),
            "--addr-file",
            str(tmp_path / "dht.txt"),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    client = None
    swarm_output = _Reader(swarm)
    try:
        assert swarm_output.wait_for("Ctrl-C", 120), swarm_output.text
        client = subprocess.Popen(
            [
                *DMOE,
                "train",
                "--initial-peers",
                *(tmp_path / "dht.txt").read_text().split(),
                "--steps",
                "1000000",
                "--no-progress",
                "--json",
                "--grid-size",
                "4",
                "--n-embd",
                "32",
                "--max-corpus-bytes",
                "200000",
                "--eval-every",
                "0",
                "--sample-chars",
                "0",
                "--threads",
                "1",
                "--checkpoint",
                str(tmp_path / "client.pt"),
                "--no-resume",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        time.sleep(seconds)
        client.send_signal(signal.SIGINT)  # Ctrl-C: the step in progress ends, the summary is printed
        out, err = client.communicate(timeout=60)
        assert client.returncode == 130, err[-4000:]
        summary = json.loads(out)
        assert summary["failed_steps"] == 0, err[-4000:]
        assert summary["steps"] >= 20, summary
        assert _stop(swarm, signal.SIGTERM, 60) == 0, swarm_output.text[-4000:]
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)
        _stop(swarm, signal.SIGTERM, 60)

    text = swarm_output.text
    kills, restarts = KILL.findall(text), RESTART.findall(text)
    assert len(kills) >= 4, text[-4000:]
    assert len(restarts) >= len(kills) - 2, "restarts cut short by the final stop aside, every kill is restarted"
    assert "could not be restarted" not in text, text[-4000:]
    checkpointed_at_kill = {}
    for peer, _pid, _uids, counts in kills:
        checkpointed_at_kill.setdefault(int(peer), []).append(_counts(counts))
    resumed_total = 0
    for peer, _pid, _endpoint, counts, verdict in restarts:
        resumed = _counts(counts)
        assert verdict == "as checkpointed", f"peer {peer} resumed {resumed} against its checkpoints"
        assert any(
            all(resumed[uid] == (count or 0) for uid, count in at_kill.items())
            for at_kill in checkpointed_at_kill[int(peer)]
        )
        resumed_total += sum(resumed.values())
        from peer import load_checkpoint

        for uid, count in resumed.items():  # and it carried on from there
            final = load_checkpoint(checkpoints / f"peer-{peer}", uid)
            assert final["update_count"] >= count, (peer, uid)
    assert resumed_total > 0, "some restarted expert had trained before it was killed, and resumed that"
    assert "every restarted peer resumed its experts' checkpointed update counts" in text
