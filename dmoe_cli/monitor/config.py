"""`MonitorConfig`: every knob of `dmoe monitor`; each field is also a flag and a `DMOE_*` variable."""

from __future__ import annotations

from dataclasses import dataclass

from dmoe_cli.config_args import config_field as _opt


@dataclass
class MonitorConfig:
    """What `dmoe monitor` watches and where it serves the page, ``/api/v1/state`` and ``/metrics``.

    `grid` (``--grid 8``, or ``--grid 4 8`` for ``ffn.i.j``) lists the experts that should exist, so that one
    never seen alive is shown down too; without it the monitor knows the experts it has seen listed.
    """

    initial_peers: list[str] = _opt((), "DHT nodes to join (required)", nargs="+", metavar="MADDR")
    prefix: str = _opt("ffn", "expert uid prefix to watch (the grid's name)")
    grid: list[int] = _opt((), "size of each grid dimension, e.g. 8 or 4 8 (default: from the experts seen)")
    host: str = _opt("127.0.0.1", "address the web server listens on (0.0.0.0 for every interface)")
    port: int = _opt(8000, "web server port; 0 picks a free one (see --addr-file)")
    addr_file: str | None = _opt(None, "write the page's URL here (atomically) once serving")
    poll_every: float = _opt(2.0, "seconds between two looks at the swarm (the page refreshes as often)")
    info_timeout: float = _opt(1.5, "seconds a peer has to answer the Info call before it counts as unreachable")
    timeout: float = _opt(10.0, "seconds to wait for the DHT per listing")
    history: float = _opt(600.0, "seconds of swarm throughput the chart shows")
    forget_peers_after: float = _opt(600.0, "seconds a peer gone from the DHT stays in the table")
    swarm_key: str | None = _opt(None, "the swarm's shared secret, for swarms whose peers require one")
    tls_ca: str | None = _opt(None, "PEM CA bundle the peers' certificates chain to: call them over TLS")
