"""Pretrained Hugging Face MoE models over the swarm: every routed expert on a peer, everything else on the client.

Tiny random checkpoints of each family are built offline (`tests/hf_tiny.py`); peers are real (`running_peer` on
127.0.0.1, or `dmoe swarm` processes), and the reference is the same checkpoint loaded whole by `transformers`.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from dht import DHTNode
from models.hf_families import CheckpointTensors, HFMoEModel, is_expert_tensor, load_hf_config
from peer.hf_experts import HFCheckpointExperts
from tests.conftest import DMOE, REPO, PeerProcess, running_peer, wait_for_experts
from tests.hf_tiny import build_tiny

PROMPT = [[1, 5, 9, 13, 17, 3, 42, 7]]
CASES = [  # every family, and every on-disk layout at least once
    ("mixtral", "per_expert"),
    ("mixtral", "fused"),
    ("qwen2_moe", "per_expert"),
    ("olmoe", "sharded"),
    ("qwen3_moe", "fused"),
    ("deepseek_v3", "per_expert"),
]


def local_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def uids_of(folder: Path, prefix: str) -> list[str]:
    return HFMoEModel.from_config(load_hf_config(folder)).uids(prefix)


@pytest.fixture(scope="module")
def dht_node():
    node = DHTNode()
    try:
        yield node
    finally:
        node.shutdown()


@pytest.mark.parametrize("family,layout", CASES)
def test_peer_expert_computes_what_the_family_expert_computes(tmp_path, family, layout):
    folder = build_tiny(family, tmp_path / family, layout=layout)
    reference = local_model(folder)
    hosted = HFCheckpointExperts(folder)
    grid = hosted.model
    x = torch.randn(5, grid.hidden_size)
    for layer in grid.moe_layers:
        experts = reference.model.layers[layer].mlp.experts
        for e in (0, grid.num_experts - 1):
            expert = hosted.load(f"hf.{layer}.{e}")
            assert expert.gate_up_proj.dtype == torch.float32  # the checkpoint's dtype
            index = torch.full((5, 1), e)
            expected = experts(x, index, torch.ones(5, 1))  # the family's own experts module, weight 1
            torch.testing.assert_close(expert(x), expected, atol=1e-5, rtol=1e-5)


def test_peer_refuses_experts_the_checkpoint_lacks(tmp_path):
    folder = build_tiny("qwen2_moe", tmp_path / "qwen", layout="per_expert")  # layer 1 is dense
    hosted = HFCheckpointExperts(folder)
    hosted.check(["q.0.0", "q.2.3"])
    with pytest.raises(ValueError, match="layer 1 .* no routed experts"):
        hosted.check(["q.1.0"])
    with pytest.raises(ValueError, match="expert 4 does not exist"):
        hosted.check(["q.0.4"])
    with pytest.raises(ValueError, match="PREFIX.LAYER.EXPERT"):
        hosted.check(["q.0"])
    with pytest.raises(ValueError, match="dtype"):
        HFCheckpointExperts(folder, dtype="int8")


def test_dtype_follows_the_checkpoint_unless_told(tmp_path):
    folder = build_tiny("mixtral", tmp_path / "mixtral", layout="fused")
    bf16 = tmp_path / "bf16"
    local_model(folder).to(torch.bfloat16).save_pretrained(bf16)
    assert HFCheckpointExperts(bf16).load("m.0.1").down_proj.dtype == torch.bfloat16
    assert HFCheckpointExperts(bf16, dtype="float32").load("m.0.1").down_proj.dtype == torch.float32


@pytest.mark.parametrize("family,layout", CASES)
def test_swarm_model_matches_local_logits_and_greedy_generate(tmp_path, dht_node, family, layout):
    from router_client import RemoteExperts, load_hf_model

    folder = build_tiny(family, tmp_path / family, layout=layout)
    uids = uids_of(folder, family)
    config = dict(hf_model=str(folder), experts=",".join(uids), optimizer="none")
    with running_peer(announce=True, initial_peers=dht_node.visible_maddrs(), **config):
        wait_for_experts(dht_node, uids)
        remote = load_hf_model(folder, uid_prefix=family, dht=dht_node, forward_timeout=20.0)
        reference = local_model(folder)
        assert type(remote) is type(reference)
        remote_layers = [m for m in remote.modules() if isinstance(m, RemoteExperts)]
        assert len(remote_layers) == len(HFMoEModel.from_config(remote.config).moe_layers)
        assert not any(p.is_meta for p in remote.parameters())
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            expected, got = reference(ids).logits, remote(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        local_ids = reference.generate(ids, max_new_tokens=8, do_sample=False)
        swarm_ids = remote.generate(ids, max_new_tokens=8, do_sample=False)  # KV cache: one token per step
        assert swarm_ids.tolist() == local_ids.tolist()
        assert sum(layer.stats["expert_requests"] for layer in remote_layers) > 0
        assert sum(layer.stats["failed_requests"] for layer in remote_layers) == 0


def test_client_never_reads_expert_tensors(tmp_path, dht_node, monkeypatch):
    from safetensors import safe_open

    from router_client import load_hf_model

    folder = build_tiny("mixtral", tmp_path / "mixtral", layout="per_expert")
    read: list[str] = []
    opened = []

    class Recording:
        def __init__(self, path, framework):
            self.handle = safe_open(path, framework=framework)
            opened.append(path)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr("safetensors.safe_open", Recording)
    load_hf_model(folder, uid_prefix="never", dht=dht_node)
    assert opened and read
    assert not [key for key in read if is_expert_tensor(key)]
    expert_keys = [key for key in CheckpointTensors(folder).files if is_expert_tensor(key)]
    assert expert_keys and len(read) == len(CheckpointTensors(folder).files) - len(expert_keys)


def test_fine_tuning_lowers_the_loss_and_trains_the_experts_on_their_peers(tmp_path, dht_node):
    from router_client import load_hf_model

    folder = build_tiny("qwen2_moe", tmp_path / "qwen", layout="fused")
    uids = uids_of(folder, "ft")
    config = dict(hf_model=str(folder), experts=",".join(uids), optimizer="adam", lr=3e-3, forward_cache_mb=64)
    with running_peer(announce=True, initial_peers=dht_node.visible_maddrs(), **config) as peer:
        wait_for_experts(dht_node, uids)
        model = load_hf_model(folder, uid_prefix="ft", dht=dht_node, forward_timeout=20.0, backward_timeout=20.0)
        model.train()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        text = torch.tensor([[1, 4, 9, 16, 25, 36, 49, 64, 81, 4, 9, 16, 25, 36, 49, 64]] * 2)
        losses = []
        for _ in range(6):
            loss = model(text, labels=text).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.05, losses
        counts = {uid: backend.update_count for uid, backend in peer.backends.items()}
        assert sum(counts.values()) > 0 and max(counts.values()) >= 3, counts
        changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
        assert any(".mlp.gate." in name for name in changed)  # the router trains on the client
        assert any("shared_expert" in name for name in changed)  # the shared expert stays local and trains too
        assert not any(".experts." in name for name in before)  # no expert weights on the client at all


@pytest.mark.slow
def test_dmoe_swarm_and_generate_match_local_and_survive_a_killed_replica(tmp_path):
    """The acceptance as a new user runs it: `dmoe swarm --hf-model`, then `dmoe generate --json`; and killing one of
    two replicas in the middle of a generation changes nothing in its output."""
    from dmoe_cli.swarm import LocalSwarm, SwarmConfig
    from router_client import load_hf_model

    folder = build_tiny("mixtral", tmp_path / "mixtral", layout="per_expert")
    reference = local_model(folder)
    prompt = torch.tensor([[1, 2, 3]])
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    config = SwarmConfig(
        peers=2,
        replicas=2,
        hf_model=str(folder),
        uid_prefix="mx",
        log_dir=str(tmp_path / "logs"),
        extra_peer_args=["--optimizer", "none", "--compute-threads", "1"],
    )
    with LocalSwarm(config) as swarm:
        assert swarm.uids == uids_of(folder, "mx") and all(hosted == swarm.uids for hosted in swarm.assignments)
        result = subprocess.run(
            [
                *DMOE,
                "generate",
                "--hf-model",
                str(folder),
                "--uid-prefix",
                "mx",
                "--initial-peers",
                *swarm.initial_peers,
                "--prompt-ids",
                "1,2,3",
                "--max-new-tokens",
                "8",
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        line = json.loads(result.stdout.strip().splitlines()[-1])
        assert line["ids"] == expected and line["tokens_per_second"] > 0

        node = DHTNode(initial_peers=swarm.initial_peers, client_mode=True)
        try:
            model = load_hf_model(folder, uid_prefix="mx", dht=node, forward_timeout=20.0)
            ids = torch.tensor(PROMPT)
            expected_long = reference.generate(ids, max_new_tokens=12, do_sample=False).tolist()
            calls, killed = [0], threading.Event()

            def kill_after_a_few_steps(_module, _inputs, _output) -> None:
                calls[0] += 1
                if calls[0] == 4 and not killed.is_set():
                    swarm.kill_peer(0)  # SIGKILL: no goodbye, its records stay in the DHT
                    killed.set()

            hook = model.model.layers[0].register_forward_hook(kill_after_a_few_steps)
            with torch.no_grad():
                got = model.generate(ids, max_new_tokens=12, do_sample=False).tolist()
            hook.remove()
            assert killed.is_set()
            assert got == expected_long
        finally:
            node.shutdown()


@pytest.mark.slow
def test_a_peer_hosting_two_of_eight_large_experts_holds_about_their_bytes(tmp_path, peer_processes):
    """RSS of a peer hosting 2 of the 8 experts of one layer, against the same peer hosting 2 experts of a tiny
    checkpoint (the base): the difference is about those two experts' bytes, far from the whole layer's."""
    large = build_tiny(
        "mixtral", tmp_path / "large", layout="fused", hidden_size=256, expert_width=4096, num_experts=8, layers=1
    )
    tiny = build_tiny("mixtral", tmp_path / "tiny", layout="fused", layers=1)
    grid = HFMoEModel.from_config(load_hf_config(large))
    expert_bytes = grid.expert_parameters * 4
    args = ["--experts", "big.0.[0:2]", "--optimizer", "none", "--forward-cache-mb", "0", "--compute-threads", "1"]
    rss = {}
    for name, folder in (("base", tiny), ("two", large)):
        process = PeerProcess(["--hf-model", str(folder), *args])
        peer_processes.append(process)
        rss[name] = _rss_bytes(process.proc.pid)
        process.kill()
    extra = rss["two"] - rss["base"]
    ratio = extra / (2 * expert_bytes)
    print(
        f"peer RSS: base {rss['base'] / 2**20:.0f} MiB, with 2 of 8 experts {rss['two'] / 2**20:.0f} MiB; "
        f"extra {extra / 2**20:.1f} MiB for 2 experts of {expert_bytes / 2**20:.1f} MiB each "
        f"(ratio {ratio:.2f}; the whole layer is {8 * expert_bytes / 2**20:.0f} MiB)"
    )
    assert extra < 4 * expert_bytes  # reading the whole layer would add 8 experts' bytes


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
