"""The swarm monitor (page in a real headless Chromium, JSON API, /metrics), peer and router metrics, and training
curves (`dmoe train --log-csv` and `dmoe plot`)."""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dht import ExpertReplica
from dmoe_cli.main import main
from dmoe_cli.monitor import Poll, SwarmTracker
from dmoe_cli.plot import read_training_log
from proto import (
    ExpertStatus,
    Method,
    TensorSpec,
    decode_response,
    encode_info_request,
    encode_request,
    encode_state_request,
)
from router_client import RemoteMixtureOfExperts
from router_client.metrics import register_router_metrics
from tests.conftest import (
    DMOE,
    HIDDEN,
    PeerProcess,
    kill_process_group,
    running_peer,
    start_in_group,
    swarm,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
POLL_EVERY = 1.5
SCREENSHOT_ENV = "DMOE_MONITOR_SCREENSHOT"  # also save the page's screenshot here (e.g. docs/monitor.png)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return samples(response.read().decode())


# ---- a headless Chromium driven over the DevTools protocol -------------------------------------------------


class Chromium:
    """One headless Chromium tab, driven through the DevTools protocol over a websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        await self.ws.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float):
        """The value of `expression` once truthy; fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"the page never satisfied {expression} (last value {value!r})")

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))


@asynccontextmanager
async def chromium_tab(profile: Path) -> AsyncIterator[Chromium]:
    """A headless Chromium (its own profile dir, a free debugging port), killed afterwards whatever happens."""
    proc = start_in_group(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,960",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its debugging port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json(content_type=None)
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Chromium(ws)
    finally:
        kill_process_group(proc)


# ---- the monitor ---------------------------------------------------------------------------------------------


@pytest.fixture
def monitor_url(dht_node, tmp_path):
    """A real `dmoe monitor` process on port 0 (its URL read from --addr-file), killed at teardown."""
    addr_file = tmp_path / "monitor-url.txt"
    proc = start_in_group(
        [
            *DMOE,
            "monitor",
            "--initial-peers",
            dht_node.visible_maddrs()[0],
            "--port",
            "0",
            "--addr-file",
            str(addr_file),
            "--poll-every",
            str(POLL_EVERY),
            "--grid",
            "6",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_process_group(proc)
                pytest.fail("dmoe monitor did not start:\n" + proc.stdout.read())
            time.sleep(0.1)
        yield addr_file.read_text().strip()
    finally:
        kill_process_group(proc)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_monitor_page_shows_every_peer_and_expert_and_turns_a_dead_peers_experts_red(
    dht_node, peer_processes, monitor_url, tmp_path
):
    maddr = dht_node.visible_maddrs()[0]
    common = ["--initial-peers", maddr, "--hidden-dim", str(HIDDEN), "--metrics-port", "0", "--sync-every", "0"]
    steady = PeerProcess([*common, "--experts", "ffn.[0:3]"])
    peer_processes.append(steady)
    doomed = PeerProcess([*common, "--experts", "ffn.[2:5]"])
    peer_processes.append(doomed)
    hosted = [f"ffn.{i}" for i in range(5)]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:  # the monitor sees both peers
                async with http.get(monitor_url + "api/v1/state") as response:
                    assert response.status == 200
                    state = await response.json()
                if state["health"]["peers_reachable"] == 2 and state["health"]["experts_live"] == 5:
                    break
                assert time.monotonic() < deadline, f"the monitor never saw the swarm: {state}"
                await asyncio.sleep(0.3)
        assert [e["uid"] for e in state["experts"]] == [*hosted, "ffn.5"]  # ffn.5: on the --grid, never hosted
        by_uid = {e["uid"]: e for e in state["experts"]}
        assert by_uid["ffn.2"]["live_replicas"] == 2 and by_uid["ffn.0"]["live_replicas"] == 1
        assert by_uid["ffn.5"]["status"] == "down" and state["health"]["experts_down"] == ["ffn.5"]
        peers = {p["endpoint"]: p for p in state["peers"]}
        assert set(peers) == {steady.endpoint, doomed.endpoint}
        assert peers[doomed.endpoint]["experts"] == ["ffn.2", "ffn.3", "ffn.4"]
        assert peers[doomed.endpoint]["transport"] == "direct" and peers[doomed.endpoint]["reachable"]
        assert peers[steady.endpoint]["peer_id"] == steady.info["peer_id"]
        metrics = scrape(monitor_url + "metrics")
        assert metrics[("dmoe_swarm_peers_reachable", ())] == 2
        assert metrics[("dmoe_swarm_expert_live_replicas", (("uid", "ffn.2"),))] == 2
        assert metrics[("dmoe_swarm_expert_live_replicas", (("uid", "ffn.5"),))] == 0

        async with chromium_tab(tmp_path / "chromium") as tab:
            await tab.send("Page.enable")
            await tab.send("Page.navigate", url=monitor_url)
            rendered = "document.querySelectorAll('tr[data-endpoint]').length === 2 && " + " && ".join(
                f"document.querySelector('g.expert[data-uid=\"{uid}\"]')?.dataset.status === 'ok'" for uid in hosted
            )
            await tab.wait_for(rendered, timeout=30)
            text = await tab.evaluate("document.body.innerText")
            assert steady.endpoint in text and doomed.endpoint in text
            assert "1 of 6 experts have no live replica: ffn.5" in text
            assert await tab.evaluate(
                "document.querySelector('g.expert[data-uid=\"ffn.5\"] rect').getAttribute('fill')"
            )
            assert await tab.evaluate("document.querySelector('g.expert[data-uid=\"ffn.5\"]').dataset.status") == "down"
            screenshot = tmp_path / "monitor.png"
            await tab.screenshot(screenshot)
            assert screenshot.read_bytes().startswith(b"\x89PNG")
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])
            print(f"screenshot of the monitor: {screenshot}")

            refreshes_at_kill = int(await tab.evaluate("document.body.dataset.refreshes"))
            doomed.kill()  # SIGKILL: its DHT records stay behind until they expire
            down = " && ".join(
                f"document.querySelector('g.expert[data-uid=\"{uid}\"]').dataset.status === 'down'"
                for uid in ("ffn.3", "ffn.4")
            )
            await tab.wait_for(f"({down}) ? Number(document.body.dataset.refreshes) : 0", timeout=6 * POLL_EVERY)
            refreshes_when_red = int(await tab.evaluate("document.body.dataset.refreshes"))
            print(f"the dead peer's experts were red after {refreshes_when_red - refreshes_at_kill} refresh(es)")
            assert refreshes_when_red - refreshes_at_kill <= 2, (refreshes_at_kill, refreshes_when_red)
            for uid in ("ffn.3", "ffn.4"):
                fill = f"document.querySelector('g.expert[data-uid=\"{uid}\"] rect').getAttribute('fill')"
                assert await tab.evaluate(fill) == "#d93025"  # red
            alive = "document.querySelector('g.expert[data-uid=\"{}\"]').dataset.live"
            assert await tab.evaluate(alive.format("ffn.2")) == "1"  # one replica left: still served
            assert await tab.evaluate(alive.format("ffn.0")) == "1"
            row = f"document.querySelector('tr[data-endpoint=\"{doomed.endpoint}\"]').dataset.reachable"
            assert await tab.evaluate(row) == "false"
            text = await tab.evaluate("document.body.innerText")
            assert "3 of 6 experts have no live replica: ffn.3, ffn.4, ffn.5" in text
            await tab.screenshot(tmp_path / "monitor-after-kill.png")

    asyncio.run(scenario())
    metrics = scrape(monitor_url + "metrics")
    assert metrics[("dmoe_swarm_peers_reachable", ())] == 1
    assert metrics[("dmoe_swarm_expert_live_replicas", (("uid", "ffn.3"),))] == 0
    assert metrics[("dmoe_swarm_expert_live_replicas", (("uid", "ffn.2"),))] == 1

    # the surviving peer's own --metrics-port (written in its endpoint file) counts the monitor's Info calls
    peer_metrics = scrape(f"http://127.0.0.1:{steady.info['metrics_port']}/metrics")
    assert peer_metrics[("dmoe_peer_requests_total", (("method", "Info"), ("status", "OK")))] >= 2
    assert peer_metrics[("dmoe_peer_expert_updates", (("uid", "ffn.0"),))] == 0


def test_monitor_refuses_a_busy_port_with_one_line(dht_node, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_in_group(
            [*DMOE, "monitor", "--initial-peers", dht_node.visible_maddrs()[0], "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _out, err = proc.communicate(timeout=60)
        finally:
            kill_process_group(proc)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith(f"dmoe monitor: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in err


# ---- peer metrics --------------------------------------------------------------------------------------------


def test_peer_metrics_count_requests_batches_updates_and_checkpoint_age(tmp_path):
    with running_peer(metrics_port=0, checkpoint_dir=str(tmp_path), hidden_dim=HIDDEN) as peer:
        url = f"http://127.0.0.1:{peer.metrics.port}/metrics"
        inputs = torch.randn(5, HIDDEN)
        with grpc.insecure_channel(peer.endpoint) as channel:
            forward = channel.unary_unary(Method.FORWARD.path)
            backward = channel.unary_unary(Method.BACKWARD.path)
            (outputs,) = decode_response(forward(encode_request("ffn.0", [inputs]), timeout=10))
            decode_response(backward(encode_request("ffn.0", [inputs, torch.ones_like(outputs)]), timeout=10))
            with pytest.raises(grpc.RpcError) as refused:
                forward(encode_request("ffn.7", [inputs]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            channel.unary_unary(Method.INFO.path)(encode_info_request(), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:  # a streamed answer, refused: no replica sharing here
                list(channel.unary_stream(Method.GET_STATE.path)(encode_state_request("ffn.0", 0), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        found = scrape(url)
    assert found[("dmoe_peer_requests_total", (("method", "Forward"), ("status", "OK")))] == 1
    assert found[("dmoe_peer_requests_total", (("method", "Forward"), ("status", "NOT_FOUND")))] == 1
    assert found[("dmoe_peer_requests_total", (("method", "Backward"), ("status", "OK")))] == 1
    assert found[("dmoe_peer_requests_total", (("method", "Info"), ("status", "OK")))] == 1
    assert found[("dmoe_peer_requests_total", (("method", "GetState"), ("status", "UNAVAILABLE")))] == 1
    assert found[("dmoe_peer_call_seconds_count", (("method", "Forward"),))] == 2
    assert found[("dmoe_peer_wire_seconds_count", (("method", "Forward"),))] == 2
    assert (
        0
        <= found[("dmoe_peer_wire_seconds_sum", (("method", "Forward"),))]
        <= found[("dmoe_peer_call_seconds_sum", (("method", "Forward"),))]
    )
    assert found[("dmoe_peer_batch_tokens_sum", (("pass", "forward"),))] == 5
    assert found[("dmoe_peer_batch_tokens_count", (("pass", "backward"),))] == 1
    assert found[("dmoe_peer_compute_seconds_count", (("pass", "forward"),))] == 1
    assert found[("dmoe_peer_tokens_total", (("pass", "forward"), ("uid", "ffn.0")))] == 5
    assert found[("dmoe_peer_tokens_total", (("pass", "forward"), ("uid", "ffn.1")))] == 0
    assert found[("dmoe_peer_expert_updates", (("uid", "ffn.0"),))] == 1
    assert found[("dmoe_peer_expert_updates", (("uid", "ffn.1"),))] == 0
    assert found[("dmoe_peer_queue_size", (("uid", "ffn.0"),))] == 0
    assert 0 <= found[("dmoe_peer_checkpoint_age_seconds", (("uid", "ffn.1"),))] < 120  # saved at start
    with pytest.raises(OSError):  # the metrics server stopped with the peer
        urllib.request.urlopen(url, timeout=2)


def test_two_in_process_peers_keep_their_metrics_apart():
    with running_peer(metrics_port=0) as first, running_peer(metrics_port=0) as second:
        with grpc.insecure_channel(first.endpoint) as channel:
            channel.unary_unary(Method.INFO.path)(encode_info_request(), timeout=10)
        info = ("dmoe_peer_requests_total", (("method", "Info"), ("status", "OK")))
        assert scrape(f"http://127.0.0.1:{first.metrics.port}/metrics")[info] == 1
        assert info not in scrape(f"http://127.0.0.1:{second.metrics.port}/metrics")


def test_a_peer_without_metrics_port_serves_no_metrics():
    with running_peer() as peer:
        assert peer.metrics is None and peer.endpoint_info()["metrics_port"] is None


@pytest.mark.slow
def test_dmoe_peer_metrics_port_is_in_its_endpoint_file(peer_processes):
    peer = PeerProcess(["--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--metrics-port", "0"], env={})
    peer_processes.append(peer)
    port = peer.info["metrics_port"]
    assert isinstance(port, int) and port > 0
    found = scrape(f"http://127.0.0.1:{port}/metrics")
    assert found[("dmoe_peer_queue_size", (("uid", "ffn.1"),))] == 0
    assert any(name == "dmoe_peer_info" for name, _ in found)


# ---- router metrics ------------------------------------------------------------------------------------------


def test_router_collector_reads_a_layers_counters_and_peer_latency(dht_node):
    registry = CollectorRegistry()
    with swarm(dht_node, {"experts": "ffn.[0:2]"}) as (peer,):
        layer = RemoteMixtureOfExperts(
            HIDDEN, (2,), "ffn", k_best=2, dht=dht_node, forward_timeout=20, allow_zero_outputs=False
        )
        register_router_metrics(layer, registry=registry)
        layer(torch.randn(3, HIDDEN))
        layer(torch.randn(4, HIDDEN))
        found = samples(generate_latest(registry).decode())
        assert found[("dmoe_router_calls_total", (("prefix", "ffn"),))] == 2
        assert found[("dmoe_router_expert_requests_total", (("prefix", "ffn"),))] == layer.stats["expert_requests"] >= 2
        assert found[("dmoe_router_failed_requests_total", (("prefix", "ffn"),))] == 0
        assert found[("dmoe_router_masked_tokens_total", (("prefix", "ffn"),))] == 0
        latency = found[("dmoe_router_peer_latency_seconds", (("endpoint", peer.endpoint),))]
        assert 0 < latency == pytest.approx(layer.scores.typical_latency(peer.endpoint))
        assert found[("dmoe_router_peer_banned", (("endpoint", peer.endpoint),))] == 0
        del layer
        gc.collect()
        found = samples(generate_latest(registry).decode())
        assert ("dmoe_router_calls_total", (("prefix", "ffn"),)) not in found  # held weakly: gone with the layer


def test_register_router_metrics_uses_the_default_registry_once():
    from prometheus_client import REGISTRY

    from router_client.metrics import router_collector

    assert router_collector() is router_collector(REGISTRY)
    assert router_collector(CollectorRegistry()) is not router_collector()


# ---- training curves -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["curve.csv", "curve.jsonl"])
def test_train_log_csv_then_plot(tmp_path, name, capsys):
    log = tmp_path / name
    args = ["train", "--ffn", "local", "--steps", "6", "--batch-size", "4", "--block-size", "16", "--n-embd", "16"]
    args += ["--n-layer", "1", "--n-head", "2", "--eval-every", "0", "--sample-chars", "0", "--no-progress"]
    args += ["--max-corpus-bytes", "100000", "--checkpoint", str(tmp_path / "client.pt"), "--log-csv", str(log)]
    assert main(args) == 0
    columns = read_training_log(log)
    assert columns["step"] == [1, 2, 3, 4, 5, 6]
    assert all(loss > 0 for loss in columns["loss"]) and all(rate > 0 for rate in columns["tokens_per_second"])
    assert columns["elapsed"] == sorted(columns["elapsed"])
    assert main([*args[:4], "9", *args[5:]]) == 0  # resumed: the same file continues
    assert read_training_log(log)["step"] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    if name.endswith(".jsonl"):
        assert json.loads(log.read_text().splitlines()[0])["step"] == 1
    else:
        assert log.read_text().count("step,loss") == 1

    capsys.readouterr()
    picture = tmp_path / "curve.png"
    assert main(["plot", str(log), "-o", str(picture)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {picture}"
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 10_000


def test_plot_of_a_file_that_is_no_training_log_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "notes.csv"
    bogus.write_text("a,b\n1,2\n")
    assert main(["plot", str(bogus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmoe plot: error:") and "is not a training log" in err and "\n" not in err
    assert main(["plot", str(tmp_path / "missing.csv")]) == 2


# ---- what the monitor remembers (SwarmTracker, fed with polls built here) -------------------------------------


def _replica(uid: str, endpoint: str, expires: float = 1e12) -> ExpertReplica:
    return ExpertReplica(uid=uid, endpoint=endpoint, peer_id="Qm" + endpoint[-4:], expiration_time=expires)


def _status(uid: str, *, batches: int = 0, rate: float = 0.0, updates: int = 0) -> ExpertStatus:
    spec = (TensorSpec((-1, HIDDEN), torch.float32),)
    return ExpertStatus(uid, "ffn", spec, spec, 10, updates, 0, 64, 0, rate, batches, 0)


def test_tracker_remembers_experts_whose_replicas_are_gone_and_peers_for_a_while():
    tracker = SwarmTracker("ffn", grid=(3,), poll_seconds=1, forget_peers_after=30)
    assert [e["status"] for e in tracker.snapshot()["experts"]] == ["down", "down", "down"]  # the grid, before any
    a, b = "127.0.0.1:1001", "127.0.0.1:1002"
    listing = {"ffn.0": [_replica("ffn.0", a)], "ffn.1": [_replica("ffn.1", a), _replica("ffn.1", b)]}
    tracker.update(
        Poll(
            100.0,
            listing,
            answers={a: [_status("ffn.0", batches=5, rate=50.0), _status("ffn.1")], b: [_status("ffn.1", updates=7)]},
        )
    )
    state = tracker.snapshot()
    assert [(e["uid"], e["live_replicas"]) for e in state["experts"]] == [("ffn.0", 1), ("ffn.1", 2), ("ffn.2", 0)]
    assert state["health"]["experts_down"] == ["ffn.2"] and state["health"]["status"] == "degraded"
    assert state["health"]["tokens_per_second"] == 0  # first sight: idle until its batch count grows

    tracker.update(
        Poll(
            101.0,
            listing,
            answers={a: [_status("ffn.0", batches=6, rate=50.0), _status("ffn.1")]},
            failures={b: "UNAVAILABLE: Connection refused"},
        )
    )
    state = tracker.snapshot()
    assert state["health"]["tokens_per_second"] == 50.0
    assert {e["uid"]: e["live_replicas"] for e in state["experts"]} == {"ffn.0": 1, "ffn.1": 1, "ffn.2": 0}
    peer_b = next(p for p in state["peers"] if p["endpoint"] == b)
    assert not peer_b["reachable"] and peer_b["error"].endswith("Connection refused")
    assert peer_b["update_counts"] == {"ffn.1": 7} and peer_b["tokens_per_second"] == 0  # last known counts stay

    tracker.update(Poll(105.0, listing, answers={a: [_status("ffn.0", batches=6, rate=50.0), _status("ffn.1")]}))
    assert tracker.snapshot()["health"]["tokens_per_second"] == 0  # no batch for 4 s: idle, whatever it reported

    tracker.update(Poll(106.0, {"ffn.0": [_replica("ffn.0", a)]}, answers={a: [_status("ffn.0")]}))
    state = tracker.snapshot()
    assert {e["uid"]: e["status"] for e in state["experts"]} == {"ffn.0": "ok", "ffn.1": "down", "ffn.2": "down"}
    peer_b = next(p for p in state["peers"] if p["endpoint"] == b)
    assert not peer_b["listed"] and "no longer listed" in peer_b["error"]

    tracker.update(Poll(107.0, None, dht_error="DHTUnavailableError: no answer"))
    state = tracker.snapshot()
    assert state["dht_error"].startswith("DHTUnavailableError") and state["experts"][0]["live_replicas"] == 1

    tracker.update(Poll(140.0, {"ffn.0": [_replica("ffn.0", a)]}, answers={a: [_status("ffn.0")]}))
    assert [p["endpoint"] for p in tracker.snapshot()["peers"]] == [a]  # b forgotten 30 s after its last listing
    assert [t for t, _ in tracker.snapshot()["throughput"]] == [100.0, 101.0, 105.0, 106.0, 107.0, 140.0]


def test_tracker_infers_a_two_dimensional_grid_from_the_experts_seen():
    tracker = SwarmTracker("ffn")
    endpoint = "127.0.0.1:1001"
    uids = ["ffn.0.1", "ffn.2.0", "ffn.1.10"]
    tracker.update(
        Poll(1.0, {uid: [_replica(uid, endpoint)] for uid in uids}, answers={endpoint: [_status(u) for u in uids]})
    )
    state = tracker.snapshot()
    assert state["grid"] == [3, 11]
    assert [e["uid"] for e in state["experts"]] == ["ffn.0.1", "ffn.1.10", "ffn.2.0"]  # by coordinates, as numbers


@pytest.mark.slow
def test_dmoe_monitor_stops_cleanly_on_sigterm(dht_node, tmp_path):
    addr_file = tmp_path / "url.txt"
    proc = start_in_group(
        [
            *DMOE,
            "monitor",
            "--initial-peers",
            dht_node.visible_maddrs()[0],
            "--port",
            "0",
            "--addr-file",
            str(addr_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (addr_file.exists() and addr_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "dmoe monitor did not start"
            time.sleep(0.1)
        url = addr_file.read_text().strip()
        with urllib.request.urlopen(url, timeout=10) as response:
            page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html") and "<svg" not in page  # drawn by its script
        assert "api/v1/state" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # offline
        with urllib.request.urlopen(url + "api/v1/state", timeout=10) as response:
            assert json.loads(response.read())["health"]["experts"] == 0
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    finally:
        kill_process_group(proc)
    assert proc.returncode == 0, output
    assert "monitor stopped" in output and not addr_file.exists()
