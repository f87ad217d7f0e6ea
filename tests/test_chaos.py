"""Chaos mode: `dmoe swarm --chaos-kill-every S --chaos-restart` SIGKILLs peers while a client trains.

Training must not notice (no failed step), and every restarted peer must carry on from the update counts its
experts' checkpoints held when it was killed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from dmoe_cli.chaos import ChaosEvent, prepare_chaos
from dmoe_cli.main import build_parser, main
from dmoe_cli.swarm import SwarmConfig
from tests.conftest import DMOE, kill_process_group, start_in_group

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
    assert kill.record() == {
        "kind": "kill",
        "peer": 2,
        "at": 5.0,
        "experts": ["ffn.1", "ffn.3"],
        "pid": 42,
        "endpoint": None,
        "update_counts": {"ffn.1": 12, "ffn.3": None},
        "checkpointed": {},
        "seconds": None,
        "error": None,
    }
    assert good.record()["resumed_as_checkpointed"] is True and bad.record()["resumed_as_checkpointed"] is False
    assert json.loads(json.dumps(good.record())) == good.record(), "a record is one JSON line as it is"


# ---------------------------------------------------------------------------- a real chaotic swarm


class _Reader:
    """Collects a process's output lines in a thread, for failure messages and the summary line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 10) -> str:
        """Everything the process printed, once it has exited."""
        self._thread.join(timeout)
        return self.text


def _wait_for_file(path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return path.exists()
        time.sleep(0.2)
    return True


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> int | None:
    """Send `sig` and wait; the whole process group is SIGKILLed when it does not exit in time (None then)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)  # the peers run in groups of their own: PR_SET_PDEATHSIG ends them
        return None


@pytest.mark.slow
def test_training_survives_sigkilled_peers_and_restarted_peers_resume_their_checkpointed_counts(tmp_path):
    seconds, interval = 30, 5
    checkpoints, events_file, addr_file = tmp_path / "checkpoints", tmp_path / "chaos.jsonl", tmp_path / "dht.txt"
    swarm = start_in_group(
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
            "--chaos-events",
            str(events_file),
            "--addr-file",
            str(addr_file),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = None
    swarm_output = _Reader(swarm)
    try:
        assert _wait_for_file(addr_file, swarm, 120), swarm_output.text  # written once every peer serves
        client = start_in_group(
            [
                *DMOE,
                "train",
                "--initial-peers",
                *addr_file.read_text().split(),
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
        if client is not None:
            kill_process_group(client)
        _stop(swarm, signal.SIGTERM, 60)
        kill_process_group(swarm)

    text = swarm_output.finish()
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    kills = [event for event in events if event["kind"] == "kill"]
    restarts = [event for event in events if event["kind"] == "restart"]
    assert len(kills) >= 4, text[-4000:]
    assert len(restarts) >= len(kills) - 2, "restarts cut short by the final stop aside, every kill is restarted"
    assert not [event for event in events if event["kind"] == "restart-failed"], text[-4000:]
    assert len(kills) == text.count(": SIGKILL peer ") and len(restarts) == text.count(": restarted peer "), (
        "every event is printed too"
    )
    checkpointed_at_kill = {}
    for kill in kills:
        assert kill["pid"] and kill["experts"] and set(kill["update_counts"]) == set(kill["experts"]), kill
        checkpointed_at_kill.setdefault(kill["peer"], []).append(kill["update_counts"])
    resumed_total = 0
    from peer import load_checkpoint

    for restart in restarts:
        peer, resumed = restart["peer"], restart["update_counts"]
        assert restart["resumed_as_checkpointed"], f"peer {peer} resumed {resumed} against its checkpoints"
        killed = [kill for kill in kills if kill["peer"] == peer and kill["at"] < restart["at"]][-1]
        assert restart["pid"] != killed["pid"] and restart["endpoint"], "a new process took the killed one's place"
        assert restart["experts"] == killed["experts"] and restart["checkpointed"] == killed["update_counts"]
        assert any(
            all(resumed[uid] == (count or 0) for uid, count in at_kill.items())
            for at_kill in checkpointed_at_kill[peer]
        )
        resumed_total += sum(resumed.values())
        for uid, count in resumed.items():  # and it carried on from there
            final = load_checkpoint(checkpoints / f"peer-{peer}", uid)
            assert final["update_count"] >= count, (peer, uid)
    assert resumed_total > 0, "some restarted expert had trained before it was killed, and resumed that"
    assert "every restarted peer resumed its experts' checkpointed update counts" in text
