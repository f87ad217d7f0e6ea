"""Checkpoints: atomic saves, resume after SIGTERM and after kill -9, and damaged files never loaded silently."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch

from peer import CheckpointError, load_checkpoint, save_checkpoint
from peer.checkpoints import checkpoint_path
from proto import deserialize_tensor, expert_pb2, expert_pb2_grpc, serialize_tensor
from tests.conftest import PeerProcess


def test_save_and_load_round_trip(tmp_path):
    state = {"module": {"w": torch.randn(3, 4)}, "update_count": 7}
    save_checkpoint(tmp_path, "ffn.0", state)
    loaded = load_checkpoint(tmp_path, "ffn.0")
    assert loaded["update_count"] == 7 and torch.equal(loaded["module"]["w"], state["module"]["w"])
    assert load_checkpoint(tmp_path, "ffn.1") is None
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    save_checkpoint(tmp_path, "ffn.0", {"update_count": 1})
    save_checkpoint(tmp_path, "ffn.0", {"update_count": 2})
    latest = checkpoint_path(tmp_path, "ffn.0")
    latest.write_bytes(latest.read_bytes()[:-10])
    assert load_checkpoint(tmp_path, "ffn.0")["update_count"] == 1
    assert str(latest) in caplog.text


def test_no_usable_checkpoint_is_an_error_naming_the_file_never_a_fresh_start(tmp_path):
    save_checkpoint(tmp_path, "ffn.0", {"update_count": 1})
    latest = checkpoint_path(tmp_path, "ffn.0")
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ffn.0.ckpt"):
        load_checkpoint(tmp_path, "ffn.0")
    latest.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a dmoe checkpoint"):
        load_checkpoint(tmp_path, "ffn.0")


def _call(endpoint: str, method: str, uid: str, *tensors: torch.Tensor):
    with grpc.insecure_channel(endpoint) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        if method == "Info":
            return stub.Info(expert_pb2.InfoRequest(uid=uid), timeout=10).experts[0]
        request = expert_pb2.ExpertRequest(uid=uid, tensors=[serialize_tensor(t) for t in tensors])
        return [deserialize_tensor(t) for t in getattr(stub, method)(request, timeout=10).tensors]


def _peer_args(directory, *extra: str) -> list[str]:
    return [
        "--experts",
        "ffn.[0:2]",
        "--hidden-dim",
        "16",
        "--optimizer",
        "adam",
        "--checkpoint-dir",
        str(directory),
        *extra,
    ]


@pytest.mark.slow
def test_a_peer_restarted_after_sigterm_resumes_exactly(tmp_path, peer_processes):
    """A peer stopped by SIGTERM and restarted from its checkpoints goes on exactly as a twin that never stopped.

    Both start from the same seed and get the same Backward calls; the parameters and update counts must match
    right after the restart and again after one more update, which uses the restored Adam moments.
    """
    x, grad = torch.randn(4, 16), torch.randn(4, 16)
    twin = PeerProcess(_peer_args(tmp_path / "twin", "--seed", "0"))
    peer_processes.append(twin)
    first = PeerProcess(_peer_args(tmp_path / "restarted", "--seed", "0", "--checkpoint-every", "3600"))
    peer_processes.append(first)
    for _ in range(2):
        for process in (twin, first):
            _call(process.endpoint, "Backward", "ffn.1", x, grad)
    (before,) = _call(first.endpoint, "Forward", "ffn.1", x)
    assert torch.equal(before, _call(twin.endpoint, "Forward", "ffn.1", x)[0]), "the twins differ before the stop"
    assert first.terminate() == 0, "".join(first.output)

    second = PeerProcess(_peer_args(tmp_path / "restarted"))  # no seed: everything must come from the checkpoint
    peer_processes.append(second)
    (after,) = _call(second.endpoint, "Forward", "ffn.1", x)
    assert torch.equal(before, after)
    assert _call(second.endpoint, "Info", "ffn.1").update_count == 2
    (fresh,) = _call(second.endpoint, "Forward", "ffn.0", x)  # never trained: saved at start, resumed exactly
    assert torch.equal(fresh, _call(twin.endpoint, "Forward", "ffn.0", x)[0])

    # the next update depends on the optimizer state: Adam moments lost in the restart would make it differ
    (grad_in,) = _call(second.endpoint, "Backward", "ffn.1", x, grad)
    (twin_grad_in,) = _call(twin.endpoint, "Backward", "ffn.1", x, grad)
    torch.testing.assert_close(grad_in, twin_grad_in, rtol=0, atol=1e-6)
    (resumed,) = _call(second.endpoint, "Forward", "ffn.1", x)
    (uninterrupted,) = _call(twin.endpoint, "Forward", "ffn.1", x)
    assert not torch.equal(resumed, after), "the third update changed nothing: the check below would be vacuous"
    torch.testing.assert_close(
        resumed, uninterrupted, rtol=0, atol=1e-6, msg=lambda detail: f"the update after the restart differs: {detail}"
    )
    assert _call(second.endpoint, "Info", "ffn.1").update_count == _call(twin.endpoint, "Info", "ffn.1").update_count
    assert _call(second.endpoint, "Info", "ffn.1").update_count == 3


@pytest.mark.slow
def test_a_peer_killed_with_sigkill_resumes_from_its_last_periodic_save(tmp_path, peer_processes):
    x, grad = torch.randn(4, 16), torch.randn(4, 16)
    first = PeerProcess(_peer_args(tmp_path, "--checkpoint-every", "0.5"))
    peer_processes.append(first)
    for _ in range(3):
        _call(first.endpoint, "Backward", "ffn.0", x, grad)
    (before,) = _call(first.endpoint, "Forward", "ffn.0", x)
    deadline = time.monotonic() + 20
    while load_checkpoint(tmp_path, "ffn.0")["update_count"] != 3:
        assert time.monotonic() < deadline, "the periodic checkpoint never caught up"
        time.sleep(0.2)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    second = PeerProcess(_peer_args(tmp_path))
    peer_processes.append(second)
    (after,) = _call(second.endpoint, "Forward", "ffn.0", x)
    assert torch.equal(before, after)
    assert _call(second.endpoint, "Info", "ffn.0").update_count == 3


@pytest.mark.slow
def test_a_peer_refuses_to_start_over_damaged_checkpoints(tmp_path):
    save_checkpoint(tmp_path, "ffn.0", {"update_count": 1})
    checkpoint_path(tmp_path, "ffn.0").write_bytes(b"DMOE-CKPT-1\nshort")
    with pytest.raises(RuntimeError, match="ffn.0.ckpt"):
        PeerProcess(_peer_args(tmp_path))
