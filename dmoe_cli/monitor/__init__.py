"""`dmoe monitor`: a web page, a JSON API and Prometheus metrics for a swarm.

`SwarmPoller` looks at the swarm (DHT listing, then every peer's Info), `SwarmTracker` remembers what it saw
(experts whose replicas are gone stay, shown down), `build_app` serves it with aiohttp (``/``,
``/api/v1/state``, ``/metrics``) and `run_monitor` ties them together until stopped.
"""

from dmoe_cli.monitor.app import build_app, run_monitor
from dmoe_cli.monitor.config import MonitorConfig
from dmoe_cli.monitor.poller import SwarmPoller, poll_forever
from dmoe_cli.monitor.state import Poll, SwarmTracker

__all__ = ["MonitorConfig", "Poll", "SwarmPoller", "SwarmTracker", "build_app", "poll_forever", "run_monitor"]
