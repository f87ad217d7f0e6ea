"""The servicer under random and mutated bytes and malformed tensors: a status code every time, no crash,
no hang, bounded memory, and the next good request still gets the right answer.

DMOE_FUZZ_CASES sets the number of cases per test (default 150; CI runs the default).
"""

from __future__ import annotations

import os
import random

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import Method, deserialize_tensor, expert_pb2, serialize_tensor
from proto.dmoe.v1 import tensor_pb2
from tests.conftest import running_peer

CASES = int(os.environ.get("DMOE_FUZZ_CASES", "150"))
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
METHODS = (Method.FORWARD, Method.BACKWARD, Method.INFO)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def fuzz_target():
    with running_peer(hidden_dim=16, max_batch_size=1024) as peer:
        channel = grpc.insecure_channel(peer.endpoint)
        calls = {m: channel.unary_unary(m.path) for m in METHODS}
        good_x = torch.randn(3, 16)
        good = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(good_x)]).SerializeToString()
        reference = deserialize_tensor(
            expert_pb2.ExpertResponse.FromString(calls["Forward"](good, timeout=10)).tensors[0]
        )
        try:
            yield peer, calls, good, reference
        finally:
            channel.close()


def _call(calls, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        calls[method](payload, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _still_healthy(peer, calls, good: bytes, reference: torch.Tensor) -> None:
    answer = expert_pb2.ExpertResponse.FromString(calls["Forward"](good, timeout=10))
    torch.testing.assert_close(deserialize_tensor(answer.tensors[0]), reference)


def test_random_and_mutated_bytes_get_status_codes(fuzz_target):
    peer, calls, good, reference = fuzz_target
    rng = random.Random(0)
    rss_before = _rss_mb()
    backward = expert_pb2.ExpertRequest(
        uid="ffn.1", tensors=[serialize_tensor(torch.randn(2, 16)), serialize_tensor(torch.randn(2, 16))]
    ).SerializeToString()
    for case in range(CASES):
        if case % 3 == 0:
            payload = rng.randbytes(rng.randrange(0, 512))
        else:
            payload = bytearray(good if case % 3 == 1 else backward)
            for _ in range(rng.randrange(1, 8)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            payload = bytes(payload)
        code = _call(calls, METHODS[case % 3], payload)
        assert code in ALLOWED, f"case {case}: {code}"
    _still_healthy(peer, calls, good, reference)
    assert _rss_mb() - rss_before < 300, "memory must stay bounded"


DTYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99, -1 & 0xFFFF])
DIMS = st.lists(st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**40, 3 * 2**30, -(2**40)])), max_size=4)
VALUES = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e38])


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    dtype=DTYPES,
    shape=DIMS,
    size=st.integers(0, 4096),
    compression=st.integers(0, 4),
    block=st.integers(0, 80),
    scales=st.integers(0, 64),
    method=st.sampled_from(["Forward", "Backward"]),
    value=VALUES,
    uid=st.sampled_from(["ffn.0", "ffn.1", "ffn.9", "", "x" * 300]),
)
def test_malformed_tensors_get_status_codes(
    fuzz_target, dtype, shape, size, compression, block, scales, method, value, uid
):
    peer, calls, good, reference = fuzz_target
    weights = {k: v.clone() for k, v in peer.backends["ffn.1"].module.state_dict().items()}
    buffer = torch.full((size // 4,), value).numpy().tobytes()
    tensor = tensor_pb2.Tensor(
        dtype=dtype, shape=shape, buffer=buffer, compression=compression, block_size=block, scales=b"\x00" * scales
    )
    tensors = [tensor] if method == "Forward" else [tensor, tensor]
    payload = expert_pb2.ExpertRequest(uid=uid, tensors=tensors).SerializeToString()
    code = _call(calls, method, payload)
    assert code in ALLOWED, code
    if method == "Backward" and code == grpc.StatusCode.OK and value != 0.0:
        for name, param in peer.backends["ffn.1"].module.state_dict().items():  # poisoned: never applied
            torch.testing.assert_close(param, weights[name])
    _still_healthy(peer, calls, good, reference)
