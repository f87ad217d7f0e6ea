"""`peer.Peer`: the volunteer node that hosts experts, serves them over gRPC and announces them in the DHT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dht import DHTNode, ExpertDirectory, load_or_create_rsa_key, make_record_validators, parse_expert_pattern
from peer.announcer import Announcer
from peer.backend import ExpertBackend, PendingBackward, run_backward
from peer.batching import BatchingQueue
from peer.checkpoints import atomic_write_bytes, load_checkpoint, save_checkpoint
from peer.compute import ComputeRunner, Phases
from peer.config import PeerConfig
from peer.experts import get_expert_class, load_custom_module
from peer.graphs import ForwardGraphStore
from peer.joint_forward import JOINT_MAX_PARAMETERS, PendingForward, run_forwards
from peer.metrics import PeerMetrics
from peer.p2p_service import RelayedService
from peer.replica_sync import ReplicaSync
from peer.security import ClientLimiter, SwarmKeyInterceptor, resolve_swarm_key, server_credentials
from peer.servicer import SERVICE_NAME, ExpertServicer, HostedExpert
from peer.state_client import StateClient
from proto import expert_pb2

logger = logging.getLogger(__name__)

PORT_FILE = "peer-port"
"""In the checkpoint dir: the gRPC port used last, taken again on restart (when free) so the endpoint stays."""
DHT_IDENTITY_FILE = "dht-identity.key"
"""In the checkpoint dir: the libp2p identity of the peer's DHT node (its peer id)."""
P2P_IDENTITY_FILE = "p2p-identity.key"
"""In the checkpoint dir: the libp2p identity of a relayed peer's data plane (the end of its endpoint)."""

GIL_SWITCH_INTERVAL = 0.0005
"""Seconds a thread that wants the GIL waits before it asks the holder to hand it over (CPython: 5 ms)."""


def shorten_gil_switch_interval() -> None:
    """Lower CPython's GIL switch interval to `GIL_SWITCH_INTERVAL` unless it is already lower.

    The compute thread releases the GIL inside each torch op and must win it back between ops, while the
    event loop and gRPC threads hold it in short bursts; at the default interval it often waited that long
    (bench/NOTES.md has the figures).
    """
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)


class Peer:
    """A volunteer node: hosts experts, serves `dmoe.v1.ExpertService` and keeps their DHT records alive.

    Lifecycle: `await peer.start()` builds the experts (resuming them from `checkpoint_dir` when it holds
    checkpoints), starts the gRPC server (with the standard health and reflection services), joins the DHT
    and starts announcing, and then writes `config.endpoint_file` when one is set; `await peer.stop()` removes
    that file, refuses new work, finishes what is in flight, stops renewing the records, saves a last
    checkpoint and leaves the DHT. `run_peer(config)` does both around SIGINT/SIGTERM. With `announce=False`
    the peer serves gRPC only (no DHT), for tests and benchmarks. `resumed` maps each uid to the update count
    its checkpoint held at start (None: it started afresh).
    """

    def __init__(self, config: PeerConfig, *, announce: bool = True):
        self.config = config
        self.announce = announce
        if config.custom_module:
            load_custom_module(config.custom_module)
        self.uids = parse_expert_pattern(config.experts) if config.experts else []
        if not self.uids:
            raise ValueError("no experts to host: pass --experts, e.g. 'ffn.[0:4]'")
        self.hf_experts = None
        """With --hf-model, the checkpoint the experts are read from (`peer.hf_experts.HFCheckpointExperts`)."""
        if config.hf_model:
            from peer.hf_experts import HFCheckpointExperts

            self.hf_experts = HFCheckpointExperts(config.hf_model, dtype=config.dtype)
            self.hf_experts.check(self.uids)
            self.expert_class = self.hf_experts.expert_class(self.uids[0])  # its name is announced
        else:
            if config.dtype != "auto":
                raise ValueError("--dtype applies to --hf-model experts only")
            self.expert_class = get_expert_class(config.expert_cls)
        if config.hidden_dim < 1:
            raise ValueError(f"--hidden-dim must be at least 1, got {config.hidden_dim}")
        _check_device(config.device)
        self.port: int | None = None
        self.dht_node: DHTNode | None = None
        self.directory: ExpertDirectory | None = None
        self.servicer: ExpertServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._compute = ComputeRunner()
        self.graphs = ForwardGraphStore(max(0, config.forward_cache_mb) << 20)
        self._background: list[asyncio.Task] = []
        self._saved_update_count: dict[str, int | None] = {}
        self.resumed: dict[str, int | None] = {}
        self.replica_sync: ReplicaSync | None = None
        """Averaging with the other replicas of the hosted experts, once the peer is in the DHT."""
        self._state_client: StateClient | None = None
        self.metrics: PeerMetrics | None = PeerMetrics() if config.metrics_port is not None else None
        """Prometheus metrics, served at `metrics.port` once started (None without `config.metrics_port`)."""
        self.relayed: RelayedService | None = None
        """With ``--reachability private``: the experts served over libp2p through a relay."""
        self._announcer: Announcer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        if config.reachability not in ("public", "private"):
            raise ValueError(f"--reachability must be public or private, got {config.reachability!r}")
        if self.private and announce and not (config.relays or config.initial_peers):
            raise ValueError(
                "--reachability private needs relays: pass --initial-peers (every `dmoe dht` node relays) or --relays"
            )

    @property
    def private(self) -> bool:
        """Whether clients reach this peer through a relay (``--reachability private``)."""
        return self.config.reachability == "private"

    @property
    def endpoint(self) -> str:
        """What clients use to reach this peer: `host:port` (gRPC), or its relayed libp2p endpoint."""
        if self.relayed is not None and self.relayed.endpoint is not None:
            return self.relayed.endpoint
        return self.grpc_endpoint

    @property
    def grpc_endpoint(self) -> str:
        """`host:port` of this peer's gRPC server."""
        return f"{_announce_host(self.config)}:{self.port}"

    @property
    def backends(self) -> dict[str, ExpertBackend]:
        """The hosted experts by uid."""
        return {uid: expert.backend for uid, expert in self.servicer.experts.items()}

    async def start(self) -> None:
        """Build the experts, start serving and (when announcing) join the DHT and declare the experts."""
        config = self.config
        shorten_gil_switch_interval()
        experts = {uid: self._build_expert(uid) for uid in self.uids}
        threads = config.compute_threads or _default_compute_threads([e.backend for e in experts.values()])
        if threads:
            await self._compute.set_threads(threads)
        if self.announce:  # the DHT child process is forked before gRPC starts its threads
            await self._start_dht()
        for expert in experts.values():
            expert.forward_queue.start()
            expert.backward_queue.start()
        max_message_bytes = config.max_message_mb * 1024 * 1024
        self.servicer = ExpertServicer(
            experts,
            max_batch_size=config.max_batch_size,
            max_message_bytes=max_message_bytes,
            limiter=ClientLimiter(max_concurrent=config.max_requests_per_client, rate=config.client_rate_limit),
            peer_id=lambda: self.dht_node.peer_id if self.dht_node is not None else "",
        )
        swarm_key = resolve_swarm_key(config.swarm_key)
        interceptors = [self.metrics.interceptor()] if self.metrics is not None else []
        self._server = grpc.aio.server(
            interceptors=[*interceptors, SwarmKeyInterceptor(swarm_key)] if swarm_key else interceptors or None,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._server.add_generic_rpc_handlers((self.servicer.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (
                expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name,
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            ),
            self._server,
        )
        self.port = self._bind_port()
        await self._server.start()
        if self.private and self.announce:
            await self._start_relayed(swarm_key, max_message_bytes)
        if self.metrics is not None:
            self.metrics.watch(experts, config.checkpoint_dir)
            self.metrics.serve(config.host, config.metrics_port)
        if self.announce:
            self._start_replica_sync()
            if config.catch_up:
                await self.replica_sync.catch_up(fresh={uid for uid, count in self.resumed.items() if count is None})
        if self._saved_update_count and config.checkpoint_dir:
            await self.save_checkpoints()  # experts that start fresh are saved at once: restarts resume them
        if config.checkpoint_dir:
            self._background.append(asyncio.create_task(self._checkpoint_loop(), name="checkpoints"))
        if self.announce:
            await self._start_announcer()
            if config.sync_every > 0:
                self._background.append(asyncio.create_task(self.replica_sync.run(), name="replica-sync"))
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.endpoint_file:
            await self._write_endpoint_file(config.endpoint_file)
        logger.info("serving %d experts at %s", len(self.uids), self.endpoint)

    def _bind_port(self) -> int:
        """Add the server's port: `config.port`, else the one this checkpoint dir used last time, else any."""
        config = self.config
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)

            def add(port: int) -> int:
                return self._server.add_secure_port(f"{_bracket(config.host)}:{port}", credentials)
        else:

            def add(port: int) -> int:
                return self._server.add_insecure_port(f"{_bracket(config.host)}:{port}")

        port_file = Path(config.checkpoint_dir) / PORT_FILE if config.checkpoint_dir else None
        if config.port == 0 and port_file is not None and port_file.exists():
            try:
                previous = int(port_file.read_text())
                if add(previous) == previous:  # the same endpoint again: its DHT records stay right
                    return previous
            except (ValueError, RuntimeError):  # a damaged file, or the port is taken now: any port will do
                pass
        try:
            port = add(config.port)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(
                f"cannot listen on {config.host}:{config.port}: the port is in use or the address is not this "
                "machine's; choose another --port (0 picks a free one) or --host"
            )
        if port_file is not None:
            port_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(port_file, f"{port}\n".encode())
        return port

    async def _start_relayed(self, swarm_key: str | None, max_message_bytes: int) -> None:
        config = self.config
        identity = str(Path(config.checkpoint_dir) / P2P_IDENTITY_FILE) if config.checkpoint_dir else None
        self.relayed = RelayedService(
            self.servicer,
            list(config.relays or config.initial_peers),
            swarm_key=swarm_key,
            max_message_bytes=max_message_bytes,
            identity_path=identity,
        )
        endpoint = await self.relayed.start()
        logger.info("reachable through a relay at %s", endpoint)

    async def _relay_changed(self, endpoint: str) -> None:
        if self._announcer is not None:
            self._announcer.endpoint = endpoint
            await self._announcer.announce_once()

    def _start_replica_sync(self) -> None:
        config = self.config
        param_bytes = {
            uid: sum(t.numel() * t.element_size() for t in backend.module.state_dict().values())
            for uid, backend in self.backends.items()
        }
        self._state_client = StateClient(
            max_state_bytes=lambda uid: 4 * param_bytes.get(uid, 0) + (1 << 20),  # parameters and two moments
            max_message_bytes=config.max_message_mb << 20,
            swarm_key=resolve_swarm_key(config.swarm_key),
            tls_ca=config.tls_ca or config.tls_cert,
            tls_cert=config.tls_cert if config.tls_ca else None,
            tls_key=config.tls_key if config.tls_ca else None,
        )
        self.replica_sync = ReplicaSync(
            self.backends,
            self._compute,
            self.directory,
            lambda: self.dht_node.peer_id,
            self._state_client,
            period=max(0.0, config.sync_every),
            timeout=min(30.0, max(5.0, config.sync_every)),
        )
        self.servicer.state_source = self.replica_sync.state

    def _build_expert(self, uid: str) -> HostedExpert:
        config = self.config
        seed = None if config.seed is None else zlib.crc32(f"{config.seed}/{uid}".encode())
        hf = self.hf_experts
        backend = ExpertBackend(
            uid,
            hf.expert_class(uid) if hf is not None else self.expert_class,
            hf.hidden_size if hf is not None else config.hidden_dim,
            optimizer=config.optimizer,
            lr=config.lr,
            clip_grad_norm=config.clip_grad_norm,
            reject_grad_norm=config.reject_grad_norm,
            device=config.device,
            seed=seed,
            graphs=self.graphs,
        )
        self._saved_update_count[uid] = self.resumed[uid] = None
        if config.checkpoint_dir:
            state = load_checkpoint(config.checkpoint_dir, uid)
            if state is not None:
                backend.load_state_dict(state)
                self._saved_update_count[uid] = self.resumed[uid] = backend.update_count
                logger.info("resumed %s from its checkpoint (%d updates)", uid, backend.update_count)

        num_inputs = len(backend.input_specs)

        def backward(tensors, forward_id, backend=backend):
            return backend.backward(tensors[:num_inputs], tensors[num_inputs:], forward_id)

        def begin(tensors, forward_id, backend=backend):
            return backend.backward_begin(tensors[:num_inputs], tensors[num_inputs:], forward_id)

        # the backwards of one pass (the experts of one BackwardMany) run in one autograd pass
        backward.phases = Phases(begin, run_backward, _end_backward, _reset_backward)

        def forward(tensors, forward_id, backend=backend):
            return backend.forward(tensors, forward_id)

        def begin_forward(tensors, forward_id, backend=backend):
            return PendingForward(backend, tensors, forward_id)

        # the small experts of one pass (of one ForwardMany) are computed together (peer.joint_forward)
        forward.phases = Phases(begin_forward, run_forwards, _end_forward, _reset_forward)

        queue_args = dict(max_batch_size=config.max_batch_size, max_queue_size=config.max_queue_size)
        return HostedExpert(
            backend,
            BatchingQueue(f"{uid}/forward", forward, self._compute, **queue_args),
            BatchingQueue(f"{uid}/backward", backward, self._compute, **queue_args),
        )

    async def _start_dht(self) -> None:
        config = self.config
        identity = config.identity
        if identity is None and config.checkpoint_dir:  # a restarted peer keeps ownership of its records
            identity = str(Path(config.checkpoint_dir) / "peer-identity.pem")
        rsa_key = await asyncio.to_thread(load_or_create_rsa_key, identity) if identity else None
        validators = make_record_validators(rsa_key)
        self.dht_node = await asyncio.to_thread(
            DHTNode,
            initial_peers=config.initial_peers,
            host=config.host,
            port=config.dht_port,
            announce_host=config.announce_host,
            record_validators=validators,
            identity_path=self._dht_identity_path(),
            client_mode=self.private,  # nobody could reach it to store or read records
        )
        self.directory = ExpertDirectory(self.dht_node, rsa_key=rsa_key)

    def _dht_identity_path(self) -> str | None:
        if self.config.dht_identity:
            return self.config.dht_identity
        if self.config.checkpoint_dir:  # a restarted peer keeps its peer id: its records replace the old ones
            return str(Path(self.config.checkpoint_dir) / DHT_IDENTITY_FILE)
        return None

    async def _start_announcer(self) -> None:
        config = self.config
        announcer = Announcer(
            self.directory,
            self.uids,
            self.endpoint,
            expert_cls=self.expert_class.name,
            load_fn=self._load_figures,
            update_period=config.update_period,
            expiration=config.expiration,
        )
        await announcer.announce_once()
        self._announcer = announcer
        self._background.append(asyncio.create_task(announcer.run(), name="announcer"))
        if self.relayed is not None:
            self._background.append(asyncio.create_task(self.relayed.watch(self._relay_changed), name="relay-watch"))

    def endpoint_info(self, dht_maddrs: Sequence[str] = ()) -> dict:
        """The endpoint file's content (its keys are described at `PeerConfig.endpoint_file`)."""
        return {
            "endpoint": self.endpoint,
            "transport": "relayed" if self.relayed is not None else "direct",
            "port": self.port,
            "pid": os.getpid(),
            "peer_id": self.dht_node.peer_id if self.dht_node is not None else "",
            "dht_maddrs": list(dht_maddrs),
            "metrics_port": self.metrics.port if self.metrics is not None else None,
            "experts": list(self.uids),
            "update_counts": {uid: backend.update_count for uid, backend in self.backends.items()},
            "resumed": dict(self.resumed),
            "caught_up": dict(self.replica_sync.stats.caught_up) if self.replica_sync is not None else {},
        }

    async def _write_endpoint_file(self, path: str) -> None:
        maddrs = await asyncio.to_thread(self.dht_node.visible_maddrs) if self.dht_node is not None else []
        data = json.dumps(self.endpoint_info(maddrs), indent=1).encode() + b"\n"
        await asyncio.to_thread(atomic_write_bytes, path, data)

    def _load_figures(self) -> dict[str, dict]:
        return {
            uid: {"queue_size": expert.queue_size, "tokens_per_second": round(expert.tokens_per_second, 1)}
            for uid, expert in self.servicer.experts.items()
        }

    async def save_checkpoints(self, *, force: bool = False) -> int:
        """Checkpoint every expert that changed since its last save; returns how many were written."""
        if not self.config.checkpoint_dir:
            return 0
        written = 0
        for uid, backend in self.backends.items():
            if not force and self._saved_update_count.get(uid) == backend.update_count:
                continue
            # the snapshot is compute too (ComputeRunner: one piece at a time): never half an optimizer step
            state = await self._compute.run(backend.state_dict)
            await asyncio.to_thread(save_checkpoint, self.config.checkpoint_dir, uid, state)
            self._saved_update_count[uid] = state["update_count"]
            written += 1
        if written:
            logger.info("checkpointed %d experts to %s", written, self.config.checkpoint_dir)
        return written

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every)
            try:
                await self.save_checkpoints()
            except Exception:
                logger.exception("periodic checkpoint failed; will retry")

    async def stop(self, *, withdraw: bool = True) -> None:
        """Graceful shutdown: refuse new work, withdraw the DHT records (unless not `withdraw`), finish in-flight
        requests, stop announcing, save, leave."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        started = time.monotonic()
        try:
            if self.config.endpoint_file:
                Path(self.config.endpoint_file).unlink(missing_ok=True)
            if self.servicer is not None:
                self.servicer.closing = True
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if withdraw:
                await self._withdraw()
            if self._state_client is not None:
                await self._state_client.close()
            if self._server is not None:
                await self._server.stop(self.config.shutdown_grace)
            if self.relayed is not None:
                await self.relayed.shutdown()
            if self.servicer is not None:
                for expert in self.servicer.experts.values():
                    await expert.forward_queue.stop()
                    await expert.backward_queue.stop()
                await self.save_checkpoints()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self._compute.shutdown(wait=True)
            if self.dht_node is not None:
                await asyncio.to_thread(self.dht_node.shutdown)
            self._stopped.set()
            logger.info("peer stopped in %.1f s", time.monotonic() - started)

    async def _withdraw(self) -> None:
        """Mark this peer's records withdrawn, so that clients stop choosing it now rather than at their expiry."""
        if self.directory is None or self.port is None:
            return
        try:
            await self.directory.withdraw(
                self.uids, self.endpoint, expiration=self.config.expiration, timeout=5.0, return_future=True
            )
        except Exception as exc:  # the DHT may be gone already: the records then simply expire
            logger.warning("could not withdraw the DHT records (%s); they expire on their own", exc)

    async def wait_stopped(self) -> None:
        """Wait until `stop()` has finished."""
        await self._stopped.wait()


async def run_peer(config: PeerConfig, *, on_ready=None) -> None:
    """Run a peer until SIGINT or SIGTERM, then shut it down gracefully. `on_ready(peer)` runs once serving."""
    peer = Peer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await peer.start()
        if on_ready is not None:
            on_ready(peer)
        await stop_requested.wait()
        logger.info("stop requested; finishing in-flight work")
    finally:
        await peer.stop()


def _default_compute_threads(backends: list[ExpertBackend]) -> int | None:
    """1 when every expert is small and computes on the CPU, else None (torch's choice: one thread per core).

    Small experts' operations are too short to split: torch's threads then only synchronise, and between
    operations they spin, taking the cores that the peer's event loop, the clients and other peers on the
    machine need (bench/NOTES.md).
    """
    small = all(b.device.type == "cpu" and b.num_parameters <= JOINT_MAX_PARAMETERS for b in backends)
    if backends and small:
        logger.info("computing on 1 thread: the experts are small (--compute-threads N to choose)")
        return 1
    return None


def _end_forward(pending: PendingForward) -> list[torch.Tensor]:
    if pending.outputs is None:
        raise RuntimeError(f"the joint forward pass left {pending.backend.uid} uncomputed")
    return pending.outputs


def _reset_forward(pending: PendingForward) -> None:
    pending.outputs = None


def _end_backward(pending: PendingBackward) -> list[torch.Tensor]:
    return pending.backend.backward_end(pending)


def _reset_backward(pending: PendingBackward) -> None:
    pending.backend.module.zero_grad(set_to_none=True)


def _check_device(device: str) -> None:
    """Refuse a `--device` this machine cannot compute on, with a line that says what to pass instead."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _announce_host(config: PeerConfig) -> str:
    if config.announce_host:
        return config.announce_host
    if config.host not in ("0.0.0.0", "::", ""):
        return config.host
    try:  # in a container the hostname maps to the container's address
        addresses = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        addresses = []
    reachable = [a for a in addresses if not a.startswith("127.")]
    if reachable:
        return reachable[0]
    logger.warning("this machine's name resolves to loopback only; pass --announce-host so others can reach it")
    return "127.0.0.1"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
