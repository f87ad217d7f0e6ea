"""libp2p plumbing for the data plane's second transport: endpoints that are multiaddrs, and p2pd daemons for it.

A peer that clients cannot reach directly (behind NAT) serves its experts over libp2p through a circuit relay
(`peer.p2p_service`), and its DHT records carry a relayed endpoint: the relay's multiaddr, ``/p2p-circuit``,
then the peer's own libp2p peer id, e.g. ``/ip4/203.0.113.7/tcp/31337/p2p/QmRelay/p2p-circuit/p2p/QmPeer``.
A ``host:port`` endpoint means gRPC. Clients (`router_client.p2p_channel`) dial relayed endpoints with a p2pd
daemon of their own. Both sides use hivemind's `P2P` (the p2pd daemon in hivemind's wheel); two of its quirks
are handled here:

* hivemind's multiaddr codec writes ``/p2p/<id>`` components as CIDs, which p2pd rejects ("length greater than
  remaining number of bytes in buffer"); `connect` encodes them as the raw multihash p2pd expects.
* With ``use_auto_relay`` and no ``-relayDiscovery=0``, p2pd's autorelay waits for 4 relay candidates or
  3 minutes before it reserves a slot; `start_p2p` turns discovery off and names the relays, so the
  reservation is made at once.

p2pd's relay service cuts every relayed connection after `RELAY_CIRCUIT_BYTES` in either direction or
`RELAY_CIRCUIT_SECONDS` (p2pd configures larger limits, then starts a second relay service with libp2p's
defaults, which is the one that answers); clients open a new circuit when one is used up.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

RELAY_CIRCUIT_BYTES = 128 << 10
"""Bytes one relayed connection carries in each direction before the relay resets it (libp2p's default)."""
RELAY_CIRCUIT_SECONDS = 120.0
"""Seconds one relayed connection lasts before the relay resets it (libp2p's default)."""
P2P_MESSAGE_BYTES = 8 << 20
"""The largest message a p2pd daemon of the data plane passes between its client and the network."""

CIRCUIT = "/p2p-circuit"
_PEER_ID_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,80}")
_P2P_CODE = 421  # the multicodec of /p2p/


def is_libp2p_endpoint(endpoint: str) -> bool:
    """Whether `endpoint` is a libp2p multiaddr (served over libp2p) rather than a gRPC ``host:port``."""
    return endpoint.startswith("/")


def is_relayed(endpoint: str) -> bool:
    """Whether `endpoint` reaches its peer through a circuit relay."""
    return is_libp2p_endpoint(endpoint) and f"{CIRCUIT}/" in endpoint


def transport_of(endpoint: str) -> str:
    """How a client reaches `endpoint`: ``direct`` (gRPC), ``relayed`` (libp2p through a relay) or ``libp2p``."""
    if not is_libp2p_endpoint(endpoint):
        return "direct"
    return "relayed" if is_relayed(endpoint) else "libp2p"


def endpoint_peer_id(endpoint: str) -> str:
    """The libp2p peer id a libp2p endpoint ends with (``…/p2p/<id>``)."""
    return endpoint.rsplit("/p2p/", 1)[1]


def circuit_endpoint(relay: str, peer_id: str) -> str:
    """The relayed endpoint of `peer_id` through `relay` (the relay's multiaddr, ending with its ``/p2p/<id>``)."""
    return f"{relay.rstrip('/')}{CIRCUIT}/p2p/{peer_id}"


def check_libp2p_endpoint(endpoint: str) -> str | None:
    """None if `endpoint` is a multiaddr that ends with ``/p2p/<peer id>`` (through at most one relay), else why."""
    if "/p2p/" not in endpoint or endpoint.count(CIRCUIT) > 1:
        return f"libp2p endpoint {endpoint!r:.80} must end with /p2p/<peer id> (through at most one /p2p-circuit)"
    if not _PEER_ID_RE.fullmatch(endpoint_peer_id(endpoint)):
        return f"libp2p endpoint {endpoint!r:.80} does not end with a peer id"
    try:
        multiaddr_bytes(endpoint)
    except Exception as exc:  # the codec's errors are of many kinds
        return f"libp2p endpoint {endpoint!r:.80} is not a valid multiaddr ({exc})"
    return None


def multiaddr_bytes(address: str) -> bytes:
    """The binary multiaddr p2pd expects: as hivemind's codec writes it, but ``/p2p/<id>`` as a raw multihash."""
    out = bytearray()
    first, *rest = address.split("/p2p/")
    if first:
        out += Multiaddr(first).to_bytes()
    for piece in rest:
        peer_id, slash, tail = piece.partition("/")
        raw = PeerID.from_base58(peer_id).to_bytes()
        out += _varint(_P2P_CODE) + _varint(len(raw)) + raw
        if slash:
            out += Multiaddr(slash + tail).to_bytes()
    return bytes(out)


class _EncodedMultiaddr:
    """What p2pd's client binding needs of a multiaddr (`to_bytes`), holding correctly encoded bytes."""

    def __init__(self, address: str):
        self._bytes = multiaddr_bytes(address)

    def to_bytes(self) -> bytes:
        return self._bytes


async def connect(p2p: P2P, endpoint: str) -> None:
    """Open (or keep) a connection from `p2p` to the peer at the libp2p `endpoint`, through its relay if any."""
    peer_id = PeerID.from_base58(endpoint_peer_id(endpoint))
    await p2p._client.connect(peer_id, [_EncodedMultiaddr(endpoint)])  # P2P has no public connect


async def disconnect(p2p: P2P, endpoint: str) -> None:
    """Close `p2p`'s connections to the peer at `endpoint` (a relayed one is used up: the next call opens another)."""
    await p2p._client.disconnect(PeerID.from_base58(endpoint_peer_id(endpoint)))


class _StaticRelayP2P(P2P):
    """hivemind's `P2P` whose daemon uses only the relays it is given (``-relayDiscovery=0``): it reserves a slot
    on them at once instead of waiting for more candidates."""

    @staticmethod
    def _make_process_args(*args, **kwargs) -> list[str]:
        if kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return P2P._make_process_args(*args, **kwargs)


async def start_p2p(
    *,
    identity_path: str | None = None,
    relays: list[str] | tuple[str, ...] = (),
    host_maddrs: list[str] | tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",),
    startup_timeout: float = 15.0,
) -> P2P:
    """Start a p2pd daemon for the data plane.

    With `relays` (multiaddrs of public nodes whose p2pd serves as a relay: every `dmoe dht` node does), the
    daemon considers itself unreachable and keeps a reservation on those relays, so that clients can reach it
    at `circuit_endpoint(relay, peer_id)`. Without, it only dials out (a client). Connections are encrypted
    end to end (TLS 1.3 or Noise), also through a relay. `identity_path` (created, as an RSA key, when missing)
    keeps the daemon's peer id across restarts; without it the daemon gets a new RSA identity (RSA: the other
    kinds' peer ids are what hivemind's codec writes as CIDs).
    """
    if identity_path is not None and not Path(identity_path).exists():
        Path(identity_path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(P2P.generate_identity, identity_path)
    if identity_path is None:
        with tempfile.TemporaryDirectory(prefix="dmoe-p2p-") as folder:
            identity = str(Path(folder) / "identity.key")
            await asyncio.to_thread(P2P.generate_identity, identity)
            return await start_p2p(
                identity_path=identity, relays=relays, host_maddrs=host_maddrs, startup_timeout=startup_timeout
            )
    options: dict = dict(
        host_maddrs=list(host_maddrs),
        identity_path=identity_path,
        check_if_identity_free=False,  # the identity is this process's own; the check starts a second daemon
        persistent_conn_max_msg_size=P2P_MESSAGE_BYTES,
        startup_timeout=startup_timeout,
        dht_mode="client",
    )
    if relays:
        options.update(
            host_maddrs=None,
            no_listen=True,  # reachable only through the relays: no socket listens, no port needs to be open
            initial_peers=list(relays),
            trusted_relays=list(relays),
            use_relay=True,
            use_auto_relay=True,
            force_reachability="private",
        )
    return await _StaticRelayP2P.create(**options)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
