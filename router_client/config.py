"""All knobs of the router in one documented dataclass, read by the Python API and the CLI alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proto.contract import COMPRESSION_NAMES, DEFAULT_MAX_MESSAGE_BYTES


def config_field(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a help text (and argparse settings such as `choices`) in its metadata.

    `dmoe_cli.config_args` turns such fields into flags and `DMOE_*` variables.
    """
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RouterConfig:
    """How a client routes tokens to remote experts: deadlines, quorum, replicas, bans and hedging.

    Deadlines cover the whole call, the DHT lookup included. `k_min` is judged per token: a token is served
    when at least `min(k_min, k_best, experts listed)` experts answered for it (banned or dead experts still count
    as listed; an expert that fails is replaced by the token's next-best live one within the same deadline).
    """

    k_min: int = config_field(1, "experts that must answer for each token before the forward may finish")
    backward_k_min: int = config_field(
        1, "experts that must return gradients for each token before the backward may finish"
    )
    forward_timeout: float = config_field(5.0, "seconds for a whole forward call, lookup included")
    backward_timeout: float = config_field(5.0, "seconds for a whole backward call")
    timeout_after_k_min: float = config_field(
        1.0, "once every token has k_min answers, wait at most this long for the rest"
    )
    allow_zero_outputs: bool = config_field(False, "a token whose experts all failed gets zeros instead of an error")
    hedge: bool = config_field(
        False, "send a second copy to another replica when a request is slower than the usual p95"
    )
    hedge_min_delay: float = config_field(0.02, "never hedge sooner than this many seconds into a request")
    ban_base: float = config_field(1.0, "seconds a failing peer is banned at first; doubles per failure in a row")
    ban_max: float = config_field(60.0, "longest ban, in seconds")
    cache_ttl: float = config_field(5.0, "seconds the grid's DHT records and replicas are reused before a refresh")
    beam_size: int | None = config_field(
        None, "grid prefixes each token keeps per level of the beam search over the DHT (default: k_best + 2)"
    )
    compression: str = config_field(
        "none", "lossy compression of tensors on the wire", choices=tuple(COMPRESSION_NAMES)
    )
    max_message_mb: int = config_field(
        DEFAULT_MAX_MESSAGE_BYTES >> 20, "largest gRPC message; larger requests are sent in chunks over a stream"
    )
    check_outputs: bool = config_field(
        True, "reject (and ban) answers with NaN/Inf, the wrong shape or an outlying norm"
    )
    outlier_norm_factor: float = config_field(
        20.0, "an answer whose norm is this many times the expert's running mean norm is rejected as poisoned"
    )
    swarm_key: str | None = config_field(None, "shared secret of a private swarm (default: DMOE_SWARM_KEY)")
    tls_ca: str | None = config_field(None, "PEM CA bundle that peers' certificates must chain to: connect over TLS")
    tls_cert: str | None = config_field(None, "PEM client certificate, for peers that require mutual TLS")
    tls_key: str | None = config_field(None, "PEM private key of --tls-cert")
    verify_fraction: float = config_field(
        0.0, "fraction of forward requests also sent to a second replica and compared; liars are banned for good"
    )
    verify_tolerance: float = config_field(
        1e-3, "largest relative difference between two replicas' answers that still agrees"
    )
    trusted_peers: str | None = config_field(None, "file of trusted peer ids, one per line: route only to those peers")
