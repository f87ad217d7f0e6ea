"""Routing over 2-d expert grids by beam search on the router's grid index, against real peers and a real DHT."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dht import ExpertDirectory
from router_client import RemoteMixtureOfExperts
from tests.conftest import HIDDEN, PeerProcess, swarm, wait_for_experts

REPO = Path(__file__).resolve().parents[1]
TWO_PEERS = ({"experts": "ffn.[0:2].[0:4]", "optimizer": "none"}, {"experts": "ffn.[2:4].[0:4]", "optimizer": "none"})


def grid_layer(node, grid=(4, 4), k_best=2, **options) -> RemoteMixtureOfExperts:
    torch.manual_seed(0)
    return RemoteMixtureOfExperts(HIDDEN, grid, "ffn", k_best, dht=ExpertDirectory(node, cache_ttl=0), **options)


def brute_force_reference(moe: RemoteMixtureOfExperts, backends: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """The same MoE in-process: every expert of the grid scored, the k best per token, softmax over them."""
    rows = sorted(backends, key=moe.index.row)
    logits = moe.gate(x).split(moe.grid_size, dim=-1)
    coords = [[int(c) for c in uid.split(".")[1:]] for uid in rows]
    scores = torch.stack([logits[0][:, i] + logits[1][:, j] for i, j in coords], dim=1)  # [tokens, experts]
    top_scores, top_index = scores.topk(k, dim=-1)
    outputs = torch.stack([backends[uid].module(x) for uid in rows], dim=1)
    chosen = outputs.gather(1, top_index.unsqueeze(-1).expand(-1, -1, HIDDEN))
    return (torch.softmax(top_scores, dim=-1).unsqueeze(-1) * chosen).sum(1)


def test_beam_search_routing_equals_an_in_process_moe_over_the_whole_grid(dht_node):
    with swarm(dht_node, *TWO_PEERS) as peers:
        moe = grid_layer(dht_node, beam_size=4)  # the beam covers every row: the selection is exact
        x = torch.randn(24, HIDDEN, requires_grad=True)
        y = moe(x)
        backends = {uid: b for p in peers for uid, b in p.backends.items()}
        x_local = x.detach().clone().requires_grad_()
        y_local = brute_force_reference(moe, backends, x_local, 2)
        torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(y)
        remote = torch.autograd.grad(y, [x, moe.gate.weight, moe.gate.bias], grad)
        local = torch.autograd.grad(y_local, [x_local, moe.gate.weight, moe.gate.bias], grad)
        for got, want in zip(remote, local, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_cold_forward_costs_one_dht_round_trip_per_grid_level_and_a_warm_one_none(dht_node):
    with swarm(dht_node, {"experts": "ffn.[0:4].[0:4]", "optimizer": "none"}):
        directory = ExpertDirectory(dht_node, cache_ttl=0)
        torch.manual_seed(0)
        moe = RemoteMixtureOfExperts(HIDDEN, (4, 4), "ffn", 2, dht=directory, cache_ttl=60.0)
        with torch.no_grad():
            moe(torch.randn(32, HIDDEN))
            # the root prefix, then every row the beams reached, at once; the rows' read-ahead, which starts when
            # the root arrives, may bring them first on a loaded machine: then only the root was waited for
            cold = moe.index.lookups["waited"]
            assert cold in (1, 2), moe.index.lookups
            # in the background: the rows nobody needed yet are read ahead, and the first look (the DHT's first
            # copies, fast) is completed by a full read once `recheck` passed
            time.sleep(1.5)
            moe(torch.randn(32, HIDDEN))
            time.sleep(1.5)
            rounds = directory.stats.dht_rounds
            for _ in range(5):
                moe(torch.randn(32, HIDDEN))
        assert moe.index.lookups["waited"] == cold and directory.stats.dht_rounds == rounds, "warm: no DHT read at all"
        assert moe.index.num_known == 16 and moe.stats["masked_tokens"] == 0


def test_rows_of_a_banned_peer_are_not_walked_and_its_experts_not_chosen(dht_node):
    with swarm(dht_node, *TWO_PEERS) as (left, right):
        moe = grid_layer(dht_node)
        x = torch.randn(64, HIDDEN)
        with torch.no_grad():
            moe(x)
            moe.scores.record_failure(right.endpoint, "test: banned")
            served = right.servicer.requests["forward"]
            y = moe(x)
        assert right.servicer.requests["forward"] == served, "no request to the banned peer"
        assert moe.stats["failed_requests"] == 0 and moe.stats["masked_tokens"] == 0
        assert bool(torch.isfinite(y).all())
        rows = moe.route(moe.gate(x).split(moe.grid_size, dim=-1), time.monotonic() + 5)[0].candidates
        assert bool((moe.index.coordinates_of(rows)[0] < 2).all()), "every candidate lives in the left peer's rows"


@pytest.mark.slow
def test_training_over_a_4096_expert_grid_on_two_peers(dht_node, peer_processes):
    common = ["--initial-peers", *dht_node.visible_maddrs(), "--hidden-dim", "16", "--sync-every", "0"]
    peer_processes.append(PeerProcess([*common, "--experts", "ffn.[0:32].[0:64]"], timeout=240))
    peer_processes.append(PeerProcess([*common, "--experts", "ffn.[32:64].[0:64]"], timeout=240))
    wait_for_experts(dht_node, ["ffn.0.0", "ffn.63.63"], timeout=120)
    script = [sys.executable, str(REPO / "examples" / "big_grid.py"), "--initial-peers", *dht_node.visible_maddrs()]
    script += ["--grid", "64", "64", "--steps", "50", "--tokens", "256", "--forward-timeout", "30"]
    done = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    print(summary)  # the timings belong to bench/, not to assertions
    assert summary["experts_known"] == 4096, "the rows under the root were read ahead in the background"
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["router"].get("failed_requests", 0) == 0
    assert summary["dht_lookups"]["waited"] <= 4, "the first steps waited for the DHT, then the index was warm"


def test_status_summarizes_a_big_grid_and_lists_it_with_all(dht_node):
    with swarm(dht_node, {"experts": "ffn.[0:6].[0:6]", "optimizer": "none"}, {"experts": "ffn.[0:3].[0:6]"}) as peers:
        status = [sys.executable, "-m", "dmoe_cli", "status", "--initial-peers", *dht_node.visible_maddrs()]
        summary = subprocess.run(status, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert summary.returncode == 0, summary.stderr
        assert "36 experts under 'ffn': grid 6 x 6, 100.0% covered" in summary.stdout
        assert "18 with 1, 18 with 2" in summary.stdout and "--all lists all 36 experts" in summary.stdout
        assert all(peer.endpoint in summary.stdout for peer in peers)
        listing = subprocess.run([*status, "--all"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert listing.stdout.count("ffn.5.5 ") == 1 and listing.stdout.count("ffn.0.0 ") == 2
        document = json.loads(
            subprocess.run([*status, "--json"], cwd=REPO, capture_output=True, text=True, timeout=120).stdout
        )
        assert document["summary"]["replicas_histogram"] == {"1": 18, "2": 18}
        assert document["summary"]["peers"][peers[0].endpoint]["experts"] == 36 and len(document["experts"]) == 36
