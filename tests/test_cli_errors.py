"""Expected errors of the `dmoe` command: one line on stderr that says what failed, a non-zero exit, no traceback.

Exit codes: 2 for what the user typed (a bad flag, address or file), 1 for a job that could not be done (nobody
answers at the given address, a port in use), 130 for Ctrl-C before the job could finish.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DMOE, REPO

pytestmark = pytest.mark.slow  # each case starts a real `dmoe` process

UNREACHABLE = "/ip4/127.0.0.1/tcp/1/p2p/QmXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"  # nobody listens on port 1


def _group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


class Dmoe:
    """A `dmoe` process in its own process group, which is always SIGKILLed at the end (`close`)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [*DMOE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        self.stdout = self.stderr = ""

    def finish(self, timeout: float = 120) -> int:
        """Wait for the exit; returns the exit code and keeps what the process printed."""
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def close(self) -> None:
        """Kill what is left of the process group and reap the process."""
        if not _group_is_gone(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.communicate(timeout=10)


def run_dmoe(*args: str, timeout: float = 120) -> Dmoe:
    """Run `dmoe ARGS` to its end; nothing it started outlives this call."""
    dmoe = Dmoe(*args)
    try:
        dmoe.finish(timeout)
    finally:
        dmoe.close()
    return dmoe


def assert_one_error_line(dmoe: Dmoe, command: str, code: int, pattern: str) -> None:
    """Exit `code`, no traceback, and the only stderr line is `dmoe COMMAND: error: ...` matching `pattern`."""
    report = f"exit code {dmoe.proc.returncode}; stderr:\n{dmoe.stderr}"
    assert dmoe.proc.returncode == code, report
    assert "Traceback" not in dmoe.stderr, report
    lines = dmoe.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dmoe {command}: error: "), report
    assert pattern in lines[0], report


@pytest.mark.parametrize(
    "args, code, pattern",
    [
        (["status", "--initial-peers", UNREACHABLE], 1, f"none of the initial peers answered ({UNREACHABLE})"),
        (["status", "--initial-peers", "127.0.0.1:1"], 2, "bad initial peer '127.0.0.1:1'"),
        (["status", "--initial-peers", UNREACHABLE, "--timeout", "0"], 2, "--timeout must be a positive"),
        (["dht", "--initial-peers", UNREACHABLE], 1, "none of the initial peers answered"),
        (["peer", "--experts", "ffn.[0:2]", "--hidden-dim", "many"], 2, "--hidden-dim"),
        (["peer", "--experts", "ffn.[0:"], 2, "expert pattern"),
        (["peer", "--experts", "ffn.[0:2]", "--hidden-dim", "-3"], 2, "--hidden-dim must be at least 1"),
        (["peer", "--experts", "ffn.[0:2]", "--device", "cuda:99"], 2, "--device cuda:99"),
        (["swarm", "--peers", "2", "--replicas", "3"], 2, "replicas (3) must not exceed peers (2)"),
        (["nosuchcommand"], 2, "invalid choice: 'nosuchcommand'"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_bad_address_flag_or_command_is_one_line_and_a_nonzero_exit(args, code, pattern):
    command = args[0] if args[0] in ("status", "dht", "peer", "swarm") else ""
    dmoe = run_dmoe(*args)
    if command:
        assert_one_error_line(dmoe, command, code, pattern)
    else:
        assert dmoe.proc.returncode == code and dmoe.stderr.count("\n") == 1 and pattern in dmoe.stderr, dmoe.stderr


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dmoe = run_dmoe("dht", "--port", str(port))
    assert_one_error_line(dmoe, "dht", 1, f"port {port} on 127.0.0.1 is already in use")


def test_files_that_are_missing_or_not_what_they_should_be_are_named(tmp_path: Path):
    garbage = tmp_path / "identity.key"
    garbage.write_bytes(b"not a key")
    assert_one_error_line(run_dmoe("dht", "--identity", str(garbage)), "dht", 2, f"{garbage} is not a libp2p")

    missing = tmp_path / "missing.pt"
    dmoe = run_dmoe("infer", "--checkpoint", str(missing), "--initial-peers", UNREACHABLE)
    assert_one_error_line(dmoe, "infer", 2, str(missing))

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ffn.0.ckpt").write_bytes(b"garbage")
    dmoe = run_dmoe("peer", "--experts", "ffn.[0:2]", "--checkpoint-dir", str(tmp_path / "ckpt"))
    # a peer logs as it goes; its error is still the one `error:` line, and the last
    assert dmoe.proc.returncode == 2 and "Traceback" not in dmoe.stderr, dmoe.stderr
    errors = [line for line in dmoe.stderr.splitlines() if line.startswith("dmoe peer: error: ")]
    assert len(errors) == 1 and dmoe.stderr.strip().splitlines()[-1] == errors[0], dmoe.stderr
    assert "ffn.0.ckpt" in errors[0] and "not a dmoe checkpoint" in errors[0], dmoe.stderr


def test_ctrl_c_before_the_job_finished_is_one_line_exit_130_and_leaves_no_process():
    dmoe = Dmoe("status", "--initial-peers", UNREACHABLE)
    try:
        time.sleep(1.0)  # still starting: importing, or joining the DHT (that takes longer than this to fail)
        assert dmoe.proc.poll() is None, "status gave up before the interrupt"
        dmoe.proc.send_signal(signal.SIGINT)
        code = dmoe.finish(60)
        time.sleep(0.5)
        assert _group_is_gone(dmoe.proc.pid), "a child process of the interrupted command is still running"
    finally:
        dmoe.close()
    assert code == 130, dmoe.stderr
    assert "Traceback" not in dmoe.stderr and dmoe.stderr.strip().endswith("interrupted"), dmoe.stderr
    assert len(dmoe.stderr.strip().splitlines()) == 1, dmoe.stderr


def test_ctrl_c_stops_a_running_dht_node_cleanly(tmp_path: Path):
    addr_file = tmp_path / "dht.addrs"
    dmoe = Dmoe("dht", "--addr-file", str(addr_file))
    try:
        deadline = time.monotonic() + 90
        while not (addr_file.exists() and addr_file.read_text()):
            assert dmoe.proc.poll() is None and time.monotonic() < deadline, "the DHT node did not start"
            time.sleep(0.1)
        dmoe.proc.send_signal(signal.SIGINT)
        code = dmoe.finish(30)
        time.sleep(0.5)
        assert _group_is_gone(dmoe.proc.pid), "the DHT daemon outlived `dmoe dht`"
    finally:
        dmoe.close()
    assert code == 0 and "Traceback" not in dmoe.stderr, dmoe.stderr
