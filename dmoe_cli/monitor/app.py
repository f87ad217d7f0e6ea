"""The monitor's web server (aiohttp): the page, ``/api/v1/state`` and ``/metrics``, and the loop that polls.

* ``GET /``: `page.html`, one static page (inline JS and SVG, nothing fetched from elsewhere) that reads
  ``api/v1/state`` every `poll_seconds` and draws it.
* ``GET /api/v1/state``: `SwarmTracker.snapshot()` as JSON.
* ``GET /metrics``: the swarm in Prometheus text format (`dmoe_cli.monitor.metrics`).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dht import DHTNode, ExpertDirectory
from dmoe_cli.monitor.config import MonitorConfig
from dmoe_cli.monitor.metrics import render, swarm_registry
from dmoe_cli.monitor.poller import SwarmPoller, poll_forever
from dmoe_cli.monitor.state import SwarmTracker

logger = logging.getLogger(__name__)

STATE_PATH = "/api/v1/state"


def page_html() -> bytes:
    """The page, as shipped in this package."""
    return importlib.resources.files("dmoe_cli.monitor").joinpath("page.html").read_bytes()


def build_app(tracker: SwarmTracker) -> web.Application:
    """The aiohttp application serving `tracker` (the polling runs elsewhere: `run_monitor`)."""
    page = page_html()
    registry = swarm_registry(tracker)

    async def index(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def state(_request: web.Request) -> web.Response:
        return web.json_response(tracker.snapshot(), headers={"Cache-Control": "no-store"})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get(STATE_PATH, state)
    app.router.add_get("/metrics", metrics)
    return app


async def run_monitor(
    config: MonitorConfig,
    node: DHTNode,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the monitor of the swarm `node` is in until `stop` is set; `on_ready(url)` once the port is bound.

    Raises OSError when the address cannot be bound, ValueError for settings that cannot work.
    """
    if not config.poll_every > 0 or not config.info_timeout > 0 or not config.timeout > 0:
        raise ValueError("--poll-every, --info-timeout and --timeout must be positive numbers of seconds")
    if any(size < 1 for size in config.grid):
        raise ValueError(f"--grid sizes must be positive, got {list(config.grid)}")
    tracker = SwarmTracker(
        config.prefix,
        grid=config.grid,
        poll_seconds=config.poll_every,
        history_seconds=config.history,
        forget_peers_after=config.forget_peers_after,
    )
    poller = SwarmPoller(
        ExpertDirectory(node, cache_ttl=0),
        config.prefix,
        dht_timeout=config.timeout,
        info_timeout=min(config.info_timeout, config.poll_every),
        swarm_key=config.swarm_key,
        tls_ca=config.tls_ca,
    )
    runner = web.AppRunner(build_app(tracker), access_log=None, handle_signals=False)
    await runner.setup()
    polling: asyncio.Task | None = None
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(
                f"cannot listen on {config.host}:{config.port} ({exc.strerror}); choose another --port "
                "(0 picks a free one) or --host"
            ) from None
        host, port = runner.addresses[0][:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        polling = asyncio.create_task(poll_forever(poller, tracker, config.poll_every), name="monitor-polls")
        logger.info("monitor serving %s", url)
        if on_ready is not None:
            on_ready(url)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, polling], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if polling.done():
            polling.result()  # the loop never ends by itself: this raises what ended it
    finally:
        if polling is not None:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
        await poller.close()
        await runner.cleanup()
