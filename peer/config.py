"""All knobs of a peer in one documented dataclass; `dmoe peer` flags and `DMOE_*` variables map onto it."""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.contract import DEFAULT_MAX_MESSAGE_BYTES


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PeerConfig:
    """Configuration of one volunteer peer: what it hosts, where it listens, how it trains and saves.

    Every field is also a `dmoe peer` flag (`--hidden-dim` for `hidden_dim`) and an environment variable
    (`DMOE_HIDDEN_DIM`); a flag wins over the variable, the variable over the default.

    `endpoint_file` is how other processes (`dmoe swarm`, the benchmarks, the tests) learn that the peer serves,
    where, and what it resumed: a JSON object written once the gRPC port serves and, when announcing, after the
    first announcement; its keys are listed in the field's help.
    """

    experts: str = _opt("", "experts to host: a pattern like 'ffn.[0:4]' or 'ffn.[0:4].[0:8]', or a list 'ffn.0,ffn.3'")
    expert_cls: str = _opt("ffn", "expert class: ffn, swiglu, or one registered by --custom-module")
    hidden_dim: int = _opt(1024, "hidden size of every hosted expert")
    custom_module: str | None = _opt(None, "Python file that registers expert classes with register_expert_class")
    hf_model: str | None = _opt(
        None,
        "Hugging Face MoE checkpoint folder: host its routed experts, --experts 'PREFIX.[0:L].[0:E]' naming expert E "
        "of decoder layer L (reads only those experts' tensors; --expert-cls and --hidden-dim are then ignored)",
    )
    dtype: str = _opt(
        "auto",
        "with --hf-model: dtype of the hosted experts (auto keeps the checkpoint's)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    initial_peers: list[str] = _opt(
        (), "multiaddrs of DHT nodes to join (from `dmoe dht`); none starts a new DHT", nargs="*"
    )
    host: str = _opt("127.0.0.1", "address the gRPC server listens on (0.0.0.0 for every interface)")
    port: int = _opt(0, "gRPC port; 0 picks a free one (and, with --checkpoint-dir, the same one again on restart)")
    announce_host: str | None = _opt(
        None, "address other machines use to reach this peer (default: --host, or this machine's IP when 0.0.0.0)"
    )
    dht_port: int = _opt(0, "port of this peer's own DHT node; 0 picks a free one")
    reachability: str = _opt(
        "public",
        "public: clients call this peer's gRPC port directly. private: nobody can reach this machine (home router, "
        "campus firewall): serve over libp2p through relays (--relays) and join the DHT as a client; no port "
        "needs to be open",
        choices=("public", "private"),
    )
    relays: list[str] = _opt(
        (),
        "with --reachability private: multiaddrs of public nodes to relay through (default: --initial-peers; every "
        "`dmoe dht` node relays)",
        nargs="*",
    )
    metrics_port: int | None = _opt(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; none: no metrics)"
    )
    device: str = _opt("cpu", "torch device for the experts: cpu, cuda, cuda:1, ...")
    max_batch_size: int = _opt(8192, "most tokens merged into one compute batch (and allowed in one request)")
    max_queue_size: int = _opt(1024, "most requests waiting per expert before RESOURCE_EXHAUSTED")
    optimizer: str = _opt(
        "adam", "optimizer each expert steps on Backward: adam, sgd or none", choices=("adam", "sgd", "none")
    )
    lr: float = _opt(1e-3, "learning rate of the experts' optimizers")
    clip_grad_norm: float | None = _opt(1.0, "clip each expert's gradient to this norm (none to disable)")
    forward_cache_mb: int = _opt(
        1024,
        "memory for training forwards kept until their Backward, in MiB, so it does not recompute them; 0 = off",
    )
    max_message_mb: int = _opt(
        DEFAULT_MAX_MESSAGE_BYTES >> 20, "largest gRPC message accepted or sent, in MiB; larger tensors are chunked"
    )
    update_period: float = _opt(20.0, "seconds between re-announcements of the hosted experts in the DHT")
    expiration: float = _opt(60.0, "seconds a DHT record of this peer stays valid without renewal")
    checkpoint_dir: str | None = _opt(None, "directory for expert checkpoints; resumed from on start")
    checkpoint_every: float = _opt(60.0, "seconds between periodic checkpoints (also saved on SIGTERM/SIGINT)")
    endpoint_file: str | None = _opt(
        None,
        "when serving, write a JSON file here (atomically) that other processes read instead of this peer's "
        "output; removed on a clean stop. Keys: endpoint (host:port, or the relayed libp2p endpoint), transport "
        "(direct or relayed), port (gRPC), pid, peer_id and dht_maddrs "
        "(empty without a DHT), metrics_port (null without --metrics-port), experts (the hosted uids), "
        "update_counts (uid: updates at start) and "
        "resumed (uid: the update count its checkpoint held, null when it started afresh)",
    )
    identity: str | None = _opt(None, "file with this peer's signing key (created if missing); keeps record ownership")
    dht_identity: str | None = _opt(
        None,
        "libp2p identity file of this peer's DHT node (created if missing): a fixed peer id, so a restarted peer's "
        "records replace its old ones (default: kept in --checkpoint-dir when there is one)",
    )
    sync_every: float = _opt(
        30.0,
        "seconds between two averaging rounds with the other replicas of each hosted expert (parameters, optimizer "
        "state, update count), so that replicas stay one expert; 0 turns averaging off",
    )
    catch_up: bool = _opt(
        True, "before announcing, load the state of a live replica that is ahead (a new or long-stopped peer)"
    )
    compute_threads: int | None = _opt(
        None, "torch intra-op threads for compute (default: 1 for small experts on the CPU, else torch's choice)"
    )
    shutdown_grace: float = _opt(10.0, "seconds to finish in-flight requests on shutdown")
    seed: int | None = _opt(None, "seed for expert initialisation (experts are seeded per uid when given)")
    swarm_key: str | None = _opt(None, "shared secret every caller must present; calls without it get UNAUTHENTICATED")
    tls_cert: str | None = _opt(None, "PEM certificate of this peer: serve gRPC over TLS")
    tls_key: str | None = _opt(None, "PEM private key of --tls-cert")
    tls_ca: str | None = _opt(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    max_requests_per_client: int = _opt(256, "requests one client may have in flight at once")
    client_rate_limit: float = _opt(0.0, "requests per second one client may send (burst 2x); 0 = unlimited")
    reject_grad_norm: float = _opt(1e6, "skip (and count) updates whose gradient norm exceeds this: poisoned data")
