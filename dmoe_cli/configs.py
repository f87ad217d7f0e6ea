"""Config dataclasses of `dmoe dht` and `dmoe status`: every flag also reads a `DMOE_*` variable.

They are mapped onto flags by `dmoe_cli.config_args` like `PeerConfig` is: the field `announce_host` is the flag
`--announce-host` and the variable `DMOE_ANNOUNCE_HOST`; a flag wins over the variable, the variable over the
default.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmoe_cli.config_args import config_field as _opt


@dataclass
class DHTConfig:
    """A bootstrap DHT node (`dmoe dht`): where it listens, what it announces, which identity it has.

    With a fixed `identity` file (and a fixed `port`) the node's multiaddr never changes, so peers and clients
    can be configured with it ahead of time (docker-compose.yml does this).
    """

    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _opt(0, "TCP port; 0 picks a free one")
    announce_host: str | None = _opt(
        None, "address other machines use to reach this node (default: every address it listens on)"
    )
    initial_peers: list[str] = _opt((), "DHT nodes to join (none starts a new DHT)", nargs="*", metavar="MADDR")
    addr_file: str | None = _opt(None, "write this node's multiaddrs here, one per line")
    identity: str | None = _opt(None, "libp2p identity file (created if missing): a fixed peer id")


@dataclass
class StatusConfig:
    """What `dmoe status` asks the swarm: the DHT nodes to ask and the uid prefix to list."""

    initial_peers: list[str] = _opt((), "DHT nodes to ask (required)", nargs="+", metavar="MADDR")
    prefix: str = _opt("ffn", "expert uid prefix to list")
    json: bool = _opt(False, "machine-readable output")
    timeout: float = _opt(15.0, "seconds to wait for the DHT")
