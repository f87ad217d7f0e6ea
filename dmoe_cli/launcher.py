"""The swarm's side of `dmoe_cli.standby`: a warm template process that forks restarted peers, and their handles."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class ForkedProcess:
    """A peer forked by the template: the parts of `subprocess.Popen` the swarm uses (pid, poll, wait, signals).

    It is the template's child, not ours: its exit code arrives from the template (`-9` when the template itself
    is gone and the process with it).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        """The exit code once the process has exited, else None."""
        if self.returncode is None and not _exists(self.pid):
            self._set_exit(-signal.SIGKILL)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raises `subprocess.TimeoutExpired` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            self._exited.wait(0.1 if left is None else min(0.1, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        if self.poll() is None:
            os.kill(self.pid, sig)


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


class PeerLauncher:
    """A running `python -m dmoe_cli.standby`: `launch(argv, log)` forks a peer from it once it is `ready`.

    `spawn(args)` starts the template (the swarm passes its own spawner, so PDEATHSIG and the environment are the
    swarm's); a reader thread takes the template's replies.
    """

    def __init__(self, spawn: Callable[[list[str]], subprocess.Popen], python: str):
        self.process = spawn([python, "-m", "dmoe_cli.standby"])
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._pids: list[int] = []
        self._pid_arrived = threading.Condition(self._lock)
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, name="dmoe-standby-reader", daemon=True)
        self._reader.start()

    @property
    def ready(self) -> bool:
        """Whether the template has imported everything and takes orders."""
        return self._ready.is_set() and self.process.poll() is None

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if message.get("ready"):
                    self._ready.set()
                elif "pid" in message:
                    self._pids.append(int(message["pid"]))
                    self._pid_arrived.notify_all()
                elif "exit" in message:
                    pid, code = int(message["exit"]), int(message["code"])
                    child = self._children.pop(pid, None)
                    if child is not None:
                        child._set_exit(code)
                    else:
                        self._early_exits[pid] = code
        with self._lock:  # the template is gone: so are its children (PDEATHSIG)
            for child in self._children.values():
                child._set_exit(-signal.SIGKILL)
            self._children.clear()
            self._ready.clear()
            self._pid_arrived.notify_all()

    def launch(self, argv: list[str], log_path: str, timeout: float = 10.0) -> ForkedProcess:
        """Fork a process running ``dmoe ARGV`` with its output appended to `log_path`; RuntimeError on failure."""
        with self._lock:
            if not self._ready.is_set():
                raise RuntimeError("the standby is not ready")
            self.process.stdin.write((json.dumps({"argv": argv, "log": log_path}) + "\n").encode())
            self.process.stdin.flush()
            deadline = time.monotonic() + timeout
            while not self._pids:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise RuntimeError("the standby did not fork the peer")
                self._pid_arrived.wait(left)
            child = ForkedProcess(self._pids.pop(0))
            if child.pid in self._early_exits:
                child._set_exit(self._early_exits.pop(child.pid))
            else:
                self._children[child.pid] = child
            return child

    def stop(self, timeout: float = 5.0) -> None:
        """End the template (its peers get SIGTERM from it dying)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
