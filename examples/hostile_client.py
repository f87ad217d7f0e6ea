"""Send a running peer the requests a hostile or broken client would, and check that it shrugs them off.

    python examples/hostile_client.py 127.0.0.1:PORT [--uid ffn.0] [--hidden-dim 64] [--swarm-key K]

Sends a 3 GB declared shape, a shape/size mismatch, garbage bytes and a NaN gradient; prints the status
code of each, then checks that a good Forward still answers and that the expert's weights did not change
(its Info update count and its answer to a fixed input are the same as before). Exits 1 if anything is off.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import torch

from proto import (
    SWARM_KEY_METADATA,
    Method,
    decode_info_response,
    decode_response,
    encode_info_request,
    encode_request,
    expert_pb2,
    serialize_tensor,
    tensor_pb2,
)


def main() -> int:
    """Run the hostile requests and the checks; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("endpoint")
    parser.add_argument("--uid", default="ffn.0")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--swarm-key", default=None)
    args = parser.parse_args()
    metadata = ((SWARM_KEY_METADATA, args.swarm_key),) if args.swarm_key else None
    channel = grpc.insecure_channel(args.endpoint)
    call = {m: channel.unary_unary(m.path) for m in (Method.FORWARD, Method.BACKWARD, Method.INFO)}

    def send(method: Method, payload: bytes) -> tuple[grpc.StatusCode, bytes | str]:
        try:
            return grpc.StatusCode.OK, call[method](payload, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    def request(*tensors: tensor_pb2.Tensor) -> bytes:  # tensors no encoder would make: built by hand
        return expert_pb2.ExpertRequest(uid=args.uid, tensors=list(tensors)).SerializeToString()

    def update_count() -> int:
        experts, _ = decode_info_response(send(Method.INFO, encode_info_request(args.uid))[1])
        return experts[0].update_count

    hidden = args.hidden_dim
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
    good = encode_request(args.uid, [x])
    code, raw = send(Method.FORWARD, good)
    if code != grpc.StatusCode.OK:
        print(f"the peer does not answer a good Forward: {code.name} {raw}")
        return 1
    (before,) = decode_response(raw)
    updates_before = update_count()

    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3 * 2**30 // (4 * hidden), hidden], buffer=b"")
    mismatch = serialize_tensor(x)
    mismatch.shape[0] = 5
    hostile = {
        "3 GB declared shape": (Method.FORWARD, request(huge)),
        "shape/size mismatch": (Method.FORWARD, request(mismatch)),
        "garbage bytes": (Method.FORWARD, bytes(range(256)) * 4),
        "NaN gradient": (Method.BACKWARD, encode_request(args.uid, [x, torch.full_like(x, float("nan"))])),
    }
    ok = True
    for name, (method, payload) in hostile.items():
        code, details = send(method, payload)
        print(f"{name:22s} -> {code.name}: {details if code != grpc.StatusCode.OK else 'answered (update skipped)'}")
        ok &= code != grpc.StatusCode.UNKNOWN and code != grpc.StatusCode.INTERNAL

    code, raw = send(Method.FORWARD, good)
    after = decode_response(raw)[0] if code == grpc.StatusCode.OK else None
    updates_after = update_count()
    same = after is not None and torch.equal(before, after) and updates_after == updates_before
    print(
        f"next good Forward      -> {code.name}; weights unchanged: {same} "
        f"(updates {updates_before} -> {updates_after})"
    )
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
