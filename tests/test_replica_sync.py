"""Replicas stay one expert: they average with each other, a new one loads the live state, identities persist."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from dht import ExpertDirectory
from proto import Method, decode_info_response, decode_response, encode_info_request, encode_request
from tests.conftest import HIDDEN, PeerProcess, running_peer, swarm, wait_for_experts

PROBE = torch.linspace(-1, 1, 3 * HIDDEN).reshape(3, HIDDEN)


def call(endpoint: str, method: Method, request: bytes) -> bytes:
    with grpc.insecure_channel(endpoint) as channel:
        return channel.unary_unary(method.path)(request, timeout=10)


def train(endpoint: str, uid: str, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, grad = torch.randn(4, HIDDEN, generator=generator), torch.randn(4, HIDDEN, generator=generator)
        call(endpoint, Method.BACKWARD, encode_request(uid, [x, grad]))


def answer(endpoint: str, uid: str) -> torch.Tensor:
    return decode_response(call(endpoint, Method.FORWARD, encode_request(uid, [PROBE])))[0]


def update_count(endpoint: str, uid: str) -> int:
    experts, _ = decode_info_response(call(endpoint, Method.INFO, encode_info_request(uid)))
    return experts[0].update_count


def test_replicas_that_trained_apart_answer_the_same_within_a_sync_period(dht_node):
    period = 2.0
    with swarm(
        dht_node,
        {"experts": "ffn.0", "seed": 1, "sync_every": period},
        {"experts": "ffn.0", "seed": 2, "sync_every": period},
    ) as (a, b):
        train(a.endpoint, "ffn.0", 5, seed=10)
        train(b.endpoint, "ffn.0", 3, seed=20)
        stopped = time.monotonic()
        assert (answer(a.endpoint, "ffn.0") - answer(b.endpoint, "ffn.0")).abs().max() > 1e-3
        while True:
            difference = float((answer(a.endpoint, "ffn.0") - answer(b.endpoint, "ffn.0")).abs().max())
            counts = update_count(a.endpoint, "ffn.0"), update_count(b.endpoint, "ffn.0")
            if difference <= 1e-4 and counts[0] == counts[1]:
                break
            assert time.monotonic() - stopped < 2 * period + 10, f"still apart: {difference}, counts {counts}"
            time.sleep(0.3)
        assert counts == (5, 5), "the replicas agree on the most advanced update count"
        assert a.replica_sync.stats.averaged >= 1 and b.replica_sync.stats.averaged >= 1
        # the optimizer moments were averaged too: the same next update keeps them together
        train(a.endpoint, "ffn.0", 1, seed=30)
        train(b.endpoint, "ffn.0", 1, seed=30)
        assert float((answer(a.endpoint, "ffn.0") - answer(b.endpoint, "ffn.0")).abs().max()) <= 1e-4


def test_a_new_replica_answers_like_the_live_one_from_its_first_request(dht_node):
    with swarm(dht_node, {"experts": "ffn.[0:2]", "seed": 1, "sync_every": 0}) as (live,):
        train(live.endpoint, "ffn.1", 4, seed=5)
        config = {"hidden_dim": HIDDEN, "initial_peers": dht_node.visible_maddrs(), "sync_every": 0}
        with running_peer(announce=True, experts="ffn.[0:2]", seed=99, **config) as fresh:
            for uid in ("ffn.0", "ffn.1"):
                assert torch.allclose(answer(fresh.endpoint, uid), answer(live.endpoint, uid), atol=1e-4)
            assert update_count(fresh.endpoint, "ffn.1") == 4, "its update count continues the live one's"
            assert fresh.replica_sync.stats.caught_up == {"ffn.0": 0, "ffn.1": 4}, "no checkpoint: both loaded"
            train(fresh.endpoint, "ffn.1", 1, seed=6)
            train(live.endpoint, "ffn.1", 1, seed=6)
            assert torch.allclose(answer(fresh.endpoint, "ffn.1"), answer(live.endpoint, "ffn.1"), atol=1e-4)
            assert update_count(fresh.endpoint, "ffn.1") == 5


@pytest.mark.slow
def test_a_restarted_peer_keeps_its_peer_id_and_port_and_a_clean_stop_withdraws_its_records(
    dht_node, peer_processes, tmp_path
):
    args = ["--initial-peers", *dht_node.visible_maddrs(), "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN)]
    args += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--update-period", "2", "--expiration", "30"]
    directory = ExpertDirectory(dht_node, cache_ttl=0)
    first = PeerProcess(args)
    peer_processes.append(first)
    wait_for_experts(dht_node, ["ffn.0", "ffn.1"])
    first.kill()  # a crash: its records stay until they expire

    second = PeerProcess(args)
    peer_processes.append(second)
    assert (second.info["peer_id"], second.endpoint) == (first.info["peer_id"], first.endpoint)
    replicas = directory.get(["ffn.0", "ffn.1"], use_cache=False)
    assert [[r.endpoint for r in replicas[uid]] for uid in ("ffn.0", "ffn.1")] == [[second.endpoint]] * 2

    assert second.terminate() == 0  # a clean stop withdraws the records at once
    assert directory.get(["ffn.0", "ffn.1"], use_cache=False) == {"ffn.0": [], "ffn.1": []}
    assert directory.list_experts("ffn", use_cache=False) == {}
