"""`DHTNode`: a hivemind DHT in a child process that is watched, timed out and restarted when it fails."""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from dht import calls
from dht.process import DHTProcess, Outcome
from dht.validation import make_record_validators

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.25  # how often a waiting call checks that the DHT process is still alive
_PROBE_TIMEOUT = 2.0  # a DHT process that does not answer a ping within this many seconds is restarted
_SHUTDOWN_GRACE = 3.0  # seconds a DHT process gets to exit on its own before it is killed


class DHTUnavailableError(RuntimeError):
    """The DHT could not serve a call: its process died, hung, is restarting, timed out, or was shut down."""


class DHTNode:
    """A supervised handle on a `hivemind.DHT`, which runs a Kademlia node in a child process.

    Contract:

    * Every call has a deadline. `run` / `arun` execute a coroutine ``fn(dht, node)`` in the DHT process and
      raise `DHTUnavailableError` instead of waiting forever when the answer does not come in time.
    * A dead DHT process is restarted with the same identity (peer id), port and initial peers, in the
      background: by a monitor thread that checks the process every `health_check_period` seconds, or by the
      call that finds it dead. That call raises `DHTUnavailableError` at once (no retry, so a caller's deadline
      is never stretched by a restart); later calls wait for the restart, within their own deadline.
    * A call that gets no answer by its deadline raises `DHTUnavailableError`; the process is then pinged
      (new calls wait for the verdict) and restarted if it does not answer within 2 s (a hung process). A call
      that merely takes too long inside a healthy process (slow or unreachable peers) raises
      `DHTUnavailableError` without a restart.
    * Exceptions raised by the coroutine itself are re-raised as they are.
    * `shutdown` is idempotent and bounded in time; it kills the process if it does not exit.

    The identity (and so the peer id and multiaddrs) survives restarts: `identity_path` is created if missing;
    without it a private temporary identity is used for the lifetime of this object.

    `record_validators`: None (the default) installs `make_record_validators()` (owner signatures with
    hivemind's process-wide RSA key, plus the dmoe record schema), so that every node of a swarm, bootstrap
    nodes included, rejects malformed and forged records; pass ``make_record_validators(key)`` to sign with a
    persistent key, or ``()`` for a node that validates nothing (tests only).

    Coroutine functions passed to `run` must be picklable (module-level functions or `functools.partial` of
    them) and should take and return small values: they cross a pipe to the DHT process. See `dht.process`
    for the two hivemind hangs this avoids (a corrupted command pipe, a lock shared by all DHT processes).
    """

    def __init__(
        self,
        *,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        announce_host: str | None = None,
        identity_path: str | None = None,
        record_validators: Sequence[RecordValidatorBase] | None = None,
        start_timeout: float = 30.0,
        call_timeout: float = 10.0,
        client_mode: bool = False,
        start_attempts: int = 3,
        max_restart_failures: int = 5,
        health_check_period: float = 1.0,
        dht_options: Mapping[str, Any] | None = None,
    ):
        if start_attempts < 1:
            raise ValueError("start_attempts must be at least 1")
        self.initial_peers = [str(maddr) for maddr in initial_peers]
        for maddr in self.initial_peers:
            _check_initial_peer(maddr)
        self.host, self.announce_host, self.client_mode = host, announce_host, client_mode
        self.start_timeout, self.call_timeout = start_timeout, call_timeout
        self.record_validators = tuple(make_record_validators() if record_validators is None else record_validators)
        self._start_attempts, self._max_restart_failures = start_attempts, max_restart_failures
        self._dht_options = dict(dht_options or {})

        self._tmp_dir: str | None = None
        if identity_path is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="dmoe-dht-")
            identity_path = os.path.join(self._tmp_dir, "identity.key")
        self.identity_path = os.path.abspath(identity_path)
        identity_existed = os.path.exists(self.identity_path)
        if not identity_existed:
            os.makedirs(os.path.dirname(self.identity_path), exist_ok=True)
            P2P.generate_identity(self.identity_path)
        with open(self.identity_path, "rb") as file:
            identity = file.read()
        try:
            self._peer_id = PeerID.from_identity(identity).to_base58()
        except Exception as exc:
            raise ValueError(
                f"{self.identity_path} is not a libp2p identity file ({exc}); give another path, or move this "
                "file away and a new identity (a new peer id) is created there"
            ) from None

        self._port_is_fixed = port != 0
        if announce_host is not None and port == 0:
            port, self._port_is_fixed = _pick_free_port(host), True  # announced multiaddrs need a real port
        self._port = port

        self._lock = threading.RLock()  # guards the fields below
        self._healthy = threading.Event()  # set while self._dht is a started, usable process
        self._closed = False
        self._recovering: threading.Thread | None = None
        self._restart_failures = 0
        self._gave_up: str | None = None
        self._dht: DHTProcess | None = None
        self._stop_monitor = threading.Event()
        self.restarts = 0

        try:
            self._dht = self._start_process(check_identity=identity_existed)
        except BaseException:
            self._cleanup_files()
            raise
        self._healthy.set()
        threading.Thread(
            target=_monitor,
            args=(weakref.ref(self), self._stop_monitor, health_check_period),
            daemon=True,
            name="dmoe-dht-monitor",
        ).start()
        _LIVE_NODES.add(self)

    # ------------------------------------------------------------------ public API

    @property
    def peer_id(self) -> str:
        """This node's libp2p peer id (base58); stable across restarts."""
        return self._peer_id

    def run(self, coro_fn: Callable, *, timeout: float | None = None) -> Any:
        """Run ``coro_fn(dht, node)`` in the DHT process and return its result, within `timeout` seconds.

        `timeout` defaults to `call_timeout`. Raises `DHTUnavailableError` when the DHT cannot answer in time
        (see the class docstring); exceptions of the coroutine itself are re-raised. Blocks the calling thread;
        use `arun` from a running event loop.
        """
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            dht = self._acquire(deadline)
            if dht is not None:
                break
            self._healthy.wait(max(0.0, deadline - time.monotonic()))
        future = self._submit(dht, coro_fn, deadline, wait_writable=True)
        while True:
            remaining = deadline - time.monotonic()
            try:
                outcome = future.result(timeout=max(0.0, min(remaining, _POLL_SECONDS)))
            except TimeoutError:
                self._check_pending(dht, future, deadline)
                continue
            return self._unwrap(dht, outcome)

    async def arun(self, coro_fn: Callable, *, timeout: float | None = None) -> Any:
        """The same as `run`, awaitable from a running event loop without blocking it."""
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            dht = self._acquire(deadline)
            if dht is not None:
                break
            await asyncio.to_thread(self._healthy.wait, max(0.0, deadline - time.monotonic()))
        future = self._submit(dht, coro_fn, deadline, wait_writable=False)
        waiter = asyncio.wrap_future(future)
        try:
            while True:
                remaining = deadline - time.monotonic()
                done, _ = await asyncio.wait({waiter}, timeout=max(0.0, min(remaining, _POLL_SECONDS)))
                if done:
                    return self._unwrap(dht, waiter.result())
                self._check_pending(dht, future, deadline)
        finally:
            if not waiter.done():
                waiter.cancel()

    def visible_maddrs(self, *, timeout: float | None = None) -> list[str]:
        """Multiaddrs at which other nodes can reach this one, each ending with ``/p2p/<peer id>``."""
        _, maddrs = self.run(calls.describe, timeout=timeout)
        return maddrs

    def is_alive(self) -> bool:
        """True while the node runs or is being restarted; False after `shutdown` or once restarting failed.

        Restarting is given up after `max_restart_failures` failed restarts in a row.
        """
        with self._lock:
            return not self._closed and self._gave_up is None

    def shutdown(self) -> None:
        """Stop the DHT process (gracefully, then by force) and free its files; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dht, self._dht = self._dht, None
            recovering = self._recovering
            self._healthy.set()  # wake up waiting calls; they see _closed and raise
        self._stop_monitor.set()
        if recovering is not None:
            recovering.join(_SHUTDOWN_GRACE + 2.0)
        if dht is not None:
            self._stop_process(dht, graceful=True)
        self._cleanup_files()
        _LIVE_NODES.discard(self)
        logger.debug("DHT node %s shut down", self._peer_id)

    def __enter__(self) -> DHTNode:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(peer_id={self._peer_id}, alive={self.is_alive()}, restarts={self.restarts})"

    @property
    def process(self) -> DHTProcess | None:
        """The current hivemind DHT process (a `multiprocessing.Process`); for diagnostics and tests."""
        return self._dht

    # ------------------------------------------------------------------ calls

    def _timeout(self, timeout: float | None) -> float:
        timeout = self.call_timeout if timeout is None else float(timeout)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return timeout

    def _acquire(self, deadline: float) -> DHTProcess | None:
        """The usable DHT process, or None if the caller should wait for a restart; raises when it cannot."""
        with self._lock:
            if self._closed:
                raise DHTUnavailableError("the DHT node has been shut down")
            if self._gave_up is not None:
                raise DHTUnavailableError(f"the DHT process could not be restarted: {self._gave_up}")
            dht = self._dht
            if self._healthy.is_set() and dht is not None:
                if dht.is_alive():
                    return dht
                reason = f"the DHT process died (exit code {dht.exitcode})"
                self._recover(dht, reason)
                raise DHTUnavailableError(f"{reason}; restarting it in the background")
            if self._recovering is None:
                self._recover(dht, "the previous restart failed")
        if time.monotonic() >= deadline:
            raise DHTUnavailableError("the DHT process is restarting and was not ready within the call timeout")
        return None

    def _submit(self, dht: DHTProcess, coro_fn: Callable, deadline: float, *, wait_writable: bool) -> Future:
        """Send the call to the DHT process; the process gets slightly less time than the caller."""
        remaining = deadline - time.monotonic()
        inner_timeout = max(0.01, remaining - min(0.25, 0.1 * remaining))
        try:
            # arun does not wait for room in the pipe: a healthy process empties it at once
            future = dht.submit(coro_fn, inner_timeout, wait_writable=max(0.0, remaining) if wait_writable else 0.05)
        except OSError as exc:
            with self._lock:
                self._recover(dht, f"its command pipe failed: {exc!r}")
            raise DHTUnavailableError(f"could not send a call to the DHT process: {exc!r}") from exc
        if future is None:
            with self._lock:
                self._recover(dht, "the DHT process stopped reading its command pipe", probe=True)
            raise DHTUnavailableError("the DHT process is not reading its commands (hung?); checking it")
        return future

    def _check_pending(self, dht: DHTProcess, future: Future, deadline: float) -> None:
        """While waiting for an answer: raise if the process died or the deadline passed."""
        if not dht.is_alive():
            dht.forget(future)
            self._unwrap(dht, ("dead", None))
        if time.monotonic() >= deadline:
            dht.forget(future)
            with self._lock:
                self._recover(dht, "a call got no answer by its deadline", probe=True)
            raise DHTUnavailableError("the DHT process did not answer within the call timeout; checking it")

    def _unwrap(self, dht: DHTProcess, outcome: Outcome) -> Any:
        status, payload = outcome
        if status == "ok":
            return payload
        if status == "timeout":
            raise DHTUnavailableError(
                "the DHT call timed out (the DHT process is healthy; peers may be slow or unreachable)"
            )
        if status == "dead":
            if self._closed:
                raise DHTUnavailableError("the DHT node has been shut down")
            reason = f"the DHT process died during a call (exit code {dht.exitcode})"
            with self._lock:
                self._recover(dht, reason)
            raise DHTUnavailableError(f"{reason}; restarting it in the background")
        raise payload

    # ------------------------------------------------------------------ supervision

    def _recover(self, dht: DHTProcess | None, reason: str, *, probe: bool = False) -> None:
        """Start a background restart of `dht` (first pinging it if `probe`); the caller holds `_lock`."""
        if self._closed or self._recovering is not None or dht is not self._dht:
            return
        self._healthy.clear()  # new calls wait for the verdict instead of going to a suspect process
        self._recovering = threading.Thread(
            target=self._restart, args=(dht, reason, probe), daemon=True, name="dmoe-dht-restart"
        )
        self._recovering.start()

    def _restart(self, dht: DHTProcess | None, reason: str, probe: bool) -> None:
        """Body of the restart thread: replace `dht` by a fresh process with the same identity and port."""
        try:
            if probe and dht is not None and self._answers_ping(dht):
                logger.info("the DHT process answers a ping after all (%s)", reason)
                self._healthy.set()
                return
            logger.warning("restarting the DHT process: %s", reason)
            if dht is not None:
                self._stop_process(dht, graceful=False)
            new_dht = self._start_process(check_identity=False)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._dht, self._restart_failures = new_dht, 0
                    self.restarts += 1
                    self._healthy.set()
            if closed:
                self._stop_process(new_dht, graceful=True)
                return
            logger.info("DHT process restarted (pid %s, restart #%d)", new_dht.pid, self.restarts)
        except Exception as exc:
            with self._lock:
                self._restart_failures += 1
                if self._restart_failures >= self._max_restart_failures:
                    self._gave_up = f"{self._restart_failures} failed restarts, the last: {exc}"
                    self._healthy.set()  # wake up waiting calls; they see _gave_up and raise
            logger.error("could not restart the DHT process: %s", exc)
        finally:
            with self._lock:
                self._recovering = None

    def _answers_ping(self, dht: DHTProcess) -> bool:
        try:
            future = dht.submit(calls.ping, _PROBE_TIMEOUT, wait_writable=_PROBE_TIMEOUT)
            return future is not None and future.result(timeout=_PROBE_TIMEOUT)[0] == "ok"
        except Exception:
            return False

    def _start_process(self, *, check_identity: bool) -> DHTProcess:
        """Start a DHT process, retrying up to `start_attempts` times; raises DHTUnavailableError if none start."""
        errors: list[str] = []
        for attempt in range(1, self._start_attempts + 1):
            # a port learned from an earlier start may have been taken meanwhile: the last try takes any port
            port = self._port if self._port_is_fixed or attempt < self._start_attempts else 0
            started = time.monotonic()
            dht = self._spawn(port, check_identity=check_identity)
            try:
                self._wait_ready(dht)
                _, maddrs = self._describe(dht)
                learned_port = _tcp_port(maddrs)
                if learned_port and learned_port != self._port:
                    if self._port:
                        logger.warning("DHT port changed from %d to %d after a restart", self._port, learned_port)
                    self._port = learned_port
                if errors:
                    logger.warning("the DHT process started after %d failed attempts: %s", len(errors), errors[-1])
                logger.info(
                    "DHT process %s started in %.2f s (peer %s, %s)",
                    dht.pid,
                    time.monotonic() - started,
                    self._peer_id,
                    maddrs[0] if maddrs else "no address",
                )
                return dht
            except Exception as exc:
                self._stop_process(dht, graceful=False)
                errors.append(_daemon_message(exc))
                logger.debug("DHT process failed to start (attempt %d/%d): %s", attempt, self._start_attempts, exc)
                if self._closed:
                    break
                time.sleep(0.2 * attempt)
        raise DHTUnavailableError(self._start_failure(errors))

    def _start_failure(self, errors: list[str]) -> str:
        """One sentence for failed starts: what failed and what to check, the daemon's words at the end."""
        last = errors[-1] if errors else "no attempt was made"
        attempts = f"{len(errors)} attempts" if len(errors) != 1 else "1 attempt"
        if "failed to connect to bootstrap peers" in last:
            return (
                f"could not join the DHT: none of the initial peers answered ({' '.join(self.initial_peers)}); "
                "check the addresses and that a DHT node (`dmoe dht` or a peer) is running there and reachable"
            )
        if "address already in use" in last:
            return (
                f"could not start the DHT node: port {self._port} on {self.host} is already in use; "
                "choose another port (0 picks a free one) or stop the process that holds it"
            )
        if "failed to listen" in last:
            return (
                f"could not start the DHT node: cannot listen on {_maddr(self.host, self._port)}; "
                f"check the host (an address of this machine) and port ({last})"
            )
        return f"the DHT process did not start ({attempts}): {last}"

    def _spawn(self, port: int, *, check_identity: bool) -> DHTProcess:
        options: dict[str, Any] = dict(
            host_maddrs=[_maddr(self.host, port)],
            identity_path=self.identity_path,
            client_mode=self.client_mode,
            check_if_identity_free=check_identity,
        )
        if self.announce_host is not None:
            options["announce_maddrs"] = [_maddr(self.announce_host, port)]
        options.update(self._dht_options)
        dht = DHTProcess(self.initial_peers or None, record_validators=self.record_validators, **options)
        dht.start_serving()
        return dht

    def _wait_ready(self, dht: DHTProcess) -> None:
        """Wait until the process reports ready; fail fast if it dies, errs, times out, or the node closes."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            outcome = dht.wait_ready(_POLL_SECONDS)
            if outcome is not None:
                status, payload = outcome
                if status == "ok":
                    return
                if status == "error":
                    raise DHTUnavailableError(f"the DHT node failed to start: {payload!r}")
            if outcome is not None or not dht.is_alive():
                raise DHTUnavailableError(f"the DHT process exited with code {dht.exitcode} before it was ready")
            if self._closed:
                raise DHTUnavailableError("the DHT node was shut down while starting")
            if time.monotonic() > deadline:
                raise DHTUnavailableError(f"the DHT process was not ready after {self.start_timeout:.0f} s")

    def _describe(self, dht: DHTProcess) -> tuple[str, list[str]]:
        future = dht.submit(calls.describe, self.start_timeout, wait_writable=self.start_timeout)
        status, payload = future.result(timeout=self.start_timeout + 1.0) if future else ("hung", None)
        if status != "ok":
            raise DHTUnavailableError(f"the new DHT process did not describe itself: {status} {payload!r}")
        return payload

    def _stop_process(self, dht: DHTProcess, *, graceful: bool) -> None:
        dht.shutdown(graceful=graceful, grace=_SHUTDOWN_GRACE)

    def _cleanup_files(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None


def _monitor(node_ref: weakref.ref, stop: threading.Event, period: float) -> None:
    """Monitor thread: restart the DHT process of the node when it has died (or a restart failed)."""
    while not stop.wait(period):
        node = node_ref()
        if node is None:
            return
        with node._lock:
            dht = node._dht
            if node._closed:
                return
            if node._recovering is None and node._gave_up is None:
                if dht is None or not node._healthy.is_set():
                    node._recover(dht, "the previous restart failed")
                elif not dht.is_alive():
                    node._recover(dht, f"the DHT process died (exit code {dht.exitcode})")
        del node


def _check_initial_peer(maddr: str) -> None:
    """Raise ValueError naming `maddr` unless it is a multiaddr ending with a peer id, as the DHT needs."""
    try:
        Multiaddr(maddr).value_for_protocol("p2p")
    except Exception as exc:
        raise ValueError(
            f"bad initial peer {maddr!r}: expected a multiaddr like /ip4/HOST/tcp/PORT/p2p/PEER_ID, "
            f"as `dmoe dht` prints it ({exc})"
        ) from None


def _daemon_message(exc: BaseException) -> str:
    """The text of a failed start without the daemon's own timestamp prefix."""
    text = str(exc)
    return re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)


def _maddr(host: str, port: int) -> str:
    """``/ip4/<host>/tcp/<port>`` (or ip6, or dns for hostnames)."""
    try:
        family = "ip6" if ipaddress.ip_address(host).version == 6 else "ip4"
    except ValueError:
        family = "dns"
    return f"/{family}/{host}/tcp/{port}"


def _tcp_port(maddrs: Sequence[str]) -> int | None:
    for maddr in maddrs:
        parts = maddr.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    return None


def _pick_free_port(host: str) -> int:
    """A TCP port that is free right now on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_LIVE_NODES: weakref.WeakSet[DHTNode] = weakref.WeakSet()


@atexit.register
def _shutdown_live_nodes() -> None:
    """At interpreter exit, shut down nodes that were not (before multiprocessing terminates their process)."""
    for node in list(_LIVE_NODES):
        node.shutdown()
