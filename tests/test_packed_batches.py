"""Packed ForwardMany/BackwardMany: the parts of one call as one tensor per argument, against a real peer.

The router's parts for one peer agree on dtype and shape but the batch size, so they travel packed: the same
answers as unpacked parts and as calls of their own, each part still failing on its own (unknown uid, wrong
shape, NaN gradient), byte for byte what protobuf writes, and a fallback for a peer from before packed batches.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from proto import (
    COMPRESSION_FLOAT16,
    LEGACY_BATCH_PARTS,
    MAX_BATCH_PARTS,
    PackedBatch,
    PartFailure,
    TensorDecodeError,
    decode_batch_request,
    decode_packed_response,
    deserialize_tensor,
    encode_packed_request,
    encode_packed_response,
    expert_pb2,
    packable,
    serialize_tensor,
)
from router_client.transport import ExpertCallError, ExpertTransport
from tests.conftest import LoopThread, running_peer


def packed_request(parts, response_compression: int = 0) -> expert_pb2.ExpertRequestBatch:
    columns = zip(*(tensors for _, tensors, _ in parts), strict=True)
    return expert_pb2.ExpertRequestBatch(
        packed=expert_pb2.PackedRequests(
            uids=[uid for uid, _, _ in parts],
            sizes=[tensors[0].shape[0] for _, tensors, _ in parts],
            forward_ids=[fid for _, _, fid in parts] if any(fid for _, _, fid in parts) else [],
            tensors=[serialize_tensor(torch.cat(column)) for column in columns],
            response_compression=response_compression,
        )
    )


@pytest.mark.parametrize("response_compression", [0, COMPRESSION_FLOAT16])
def test_packed_messages_are_the_bytes_protobuf_writes_and_read_back(response_compression):
    x, y = torch.randn(3, 4), torch.randn(2, 4)
    parts = [("ffn.0", [x, x + 1], 7), ("ünï.1", [y, y + 1], 2**64 - 1)]
    raw = encode_packed_request(parts, response_compression=response_compression)
    assert raw == packed_request(parts, response_compression).SerializeToString()
    batch = decode_batch_request(raw)
    assert isinstance(batch, PackedBatch)
    assert (batch.uids, batch.sizes, batch.forward_ids) == (["ffn.0", "ünï.1"], [3, 2], [7, 2**64 - 1])
    assert batch.response_compression == response_compression
    (first, second) = batch.split([deserialize_tensor(part) for part in batch.parts])
    assert torch.equal(first[1], x + 1) and torch.equal(second[0], y)
    assert decode_batch_request(encode_packed_request([("a", [x], 0)])).forward_ids == [0]

    results = [[x], PartFailure(grpc.StatusCode.NOT_FOUND, "no such expert ü"), [y]]
    raw = encode_packed_response(results)
    expected = expert_pb2.ExpertResponseBatch(
        packed=expert_pb2.PackedResults(
            codes=[0, grpc.StatusCode.NOT_FOUND.value[0], 0],
            messages=["", "no such expert ü", ""],
            tensors=[serialize_tensor(torch.cat([x, y]))],
        )
    )
    assert raw == expected.SerializeToString()
    ok, failed, last = decode_packed_response(raw, [3, 9, 2])
    assert torch.equal(ok[0], x) and torch.equal(last[0], y) and failed.code == grpc.StatusCode.NOT_FOUND
    (only_failure,) = decode_packed_response(encode_packed_response([PartFailure(grpc.StatusCode.INTERNAL, "")]), [4])
    assert only_failure.code == grpc.StatusCode.INTERNAL


def test_only_parts_that_agree_pack_and_malformed_packed_messages_raise_decode_errors():
    x = torch.randn(3, 4)
    assert packable([("a", [x], 0), ("b", [torch.randn(1, 4)], 0)])
    assert not packable([("a", [x], 0), ("b", [torch.randn(1, 5)], 0)])  # another width
    assert not packable([("a", [x], 0), ("b", [x.double()], 0)])  # another dtype
    assert not packable([("a", [x, torch.randn(2, 4)], 0)])  # two batch sizes in one part
    assert not packable([("a", [torch.tensor(1.0)], 0)]) and not packable([("a", [], 0)])
    with pytest.raises(ValueError):
        encode_packed_request([("a", [x], 0), ("b", [x.double()], 0)])
    with pytest.raises(ValueError):
        encode_packed_request([("a", [x], 0)] * (MAX_BATCH_PARTS + 1))

    def packed(**fields) -> bytes:
        return expert_pb2.ExpertRequestBatch(packed=expert_pb2.PackedRequests(**fields)).SerializeToString()

    for raw in (
        packed(uids=["a", "b"], sizes=[3]),  # a size missing
        packed(uids=["a", "b"], sizes=[3, 0]),  # a part of no rows
        packed(uids=["a"], sizes=[3], forward_ids=[1, 2]),
        packed(uids=[], sizes=[]),
        expert_pb2.ExpertRequestBatch(
            requests=[expert_pb2.ExpertRequest(uid="a")], packed=expert_pb2.PackedRequests(uids=["a"], sizes=[1])
        ).SerializeToString(),
    ):
        with pytest.raises(TensorDecodeError):
            decode_batch_request(raw)
    answer = encode_packed_response([[x]])
    with pytest.raises(TensorDecodeError):
        decode_packed_response(answer, [2])  # 3 rows for parts of 2
    with pytest.raises(TensorDecodeError):
        decode_packed_response(answer, [3, 1])
    with pytest.raises(TensorDecodeError):
        decode_packed_response(expert_pb2.ExpertResponseBatch().SerializeToString(), [3])


def call(stub_method, message: expert_pb2.ExpertRequestBatch) -> expert_pb2.PackedResults:
    return stub_method(message, timeout=10).packed


def test_a_peer_answers_packed_parts_as_it_answers_them_unpacked_each_failing_alone(peer, stub):
    x0, x1 = torch.randn(3, 16), torch.randn(5, 16)
    parts = [("ffn.0", [x0], 11), ("ffn.9", [x0], 12), ("ffn.1", [x1], 13)]
    answer = call(stub.ForwardMany, packed_request(parts))
    assert list(answer.codes) == [0, grpc.StatusCode.NOT_FOUND.value[0], 0] and "ffn.9" in answer.messages[1]
    (outputs,) = [deserialize_tensor(t) for t in answer.tensors]
    assert outputs.shape == (8, 16)
    for uid, x, rows in (("ffn.0", x0, outputs[:3]), ("ffn.1", x1, outputs[3:])):
        single = stub.Forward(expert_pb2.ExpertRequest(uid=uid, tensors=[serialize_tensor(x)]), timeout=10)
        torch.testing.assert_close(rows, deserialize_tensor(single.tensors[0]))

    bad = torch.randn(3, 16)
    bad[1, 2] = float("nan")
    grads = [("ffn.0", [x0, torch.randn(3, 16)], 11), ("ffn.1", [x1, torch.randn(5, 16)], 13), ("ffn.0", [x0, bad], 0)]
    before = {uid: peer.backends[uid].update_count for uid in ("ffn.0", "ffn.1")}
    answer = call(stub.BackwardMany, packed_request(grads))
    assert list(answer.codes) == [0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]], answer.messages
    assert "NaN" in answer.messages[2]
    assert deserialize_tensor(answer.tensors[0]).shape == (8, 16)
    assert {uid: peer.backends[uid].update_count - before[uid] for uid in before} == {"ffn.0": 1, "ffn.1": 1}
    assert peer.graphs.hits >= 2, "the packed Backward reused the packed Forward's kept graphs"


def test_a_peer_refuses_a_packed_batch_whose_tensors_do_not_match_its_sizes(peer, stub):
    message = packed_request([("ffn.0", [torch.randn(3, 16)], 0)])
    message.packed.sizes[:] = [4]
    with pytest.raises(grpc.RpcError) as info:
        stub.ForwardMany(message, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "4 rows" in info.value.details()
    wide = packed_request([("ffn.0", [torch.randn(2, 16)], 0), ("ffn.1", [torch.randn(1, 16)], 0)])
    wide.packed.tensors[0].CopyFrom(serialize_tensor(torch.randn(3, 4096)))
    with pytest.raises(grpc.RpcError) as info:
        stub.ForwardMany(wide, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "larger than any expert" in info.value.details()
    narrow = packed_request([("ffn.0", [torch.randn(2, 8)], 0)])
    (part,) = call(stub.ForwardMany, narrow).codes
    assert part == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_the_transport_packs_a_peers_parts_and_unpacks_them_for_a_peer_from_before_packing():
    loop = LoopThread()
    try:
        with running_peer(experts="ffn.[0:3]") as peer:
            transport = ExpertTransport()
            requests = [(f"ffn.{i}", [torch.randn(i + 1, 16)], 0) for i in range(3)] + [
                ("ffn.7", [torch.randn(2, 16)], 0)
            ]
            requests += [(f"ffn.{i % 3}", [torch.randn(1, 16)], 0) for i in range(LEGACY_BATCH_PARTS)]  # two old calls

            def answers():
                return loop.run(transport.call_many(peer.endpoint, requests, backward=False, timeout=10))

            packed = answers()
            assert [o[0].shape for o in packed[:3]] == [(1, 16), (2, 16), (3, 16)]
            assert isinstance(packed[3], ExpertCallError) and packed[3].code == grpc.StatusCode.NOT_FOUND
            assert peer.servicer.calls["ForwardMany"] == 1 and peer.endpoint not in transport._no_packing

            def refuse_like_an_old_peer(batch, backward):  # an old peer sees an empty batch of unpacked parts
                from peer.servicer import RequestError

                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid dmoe.v1.ExpertRequestBatch: a batch holds 1 to {LEGACY_BATCH_PARTS} "
                    "requests, got 0",
                )

            peer.servicer._unpacked = refuse_like_an_old_peer
            unpacked = answers()
            # the refused packed call, then the parts unpacked in calls an old peer accepts
            assert peer.endpoint in transport._no_packing and peer.servicer.calls["ForwardMany"] == 4
            assert isinstance(unpacked[3], ExpertCallError) and unpacked[3].code == grpc.StatusCode.NOT_FOUND
            for before, after in zip(packed[:3] + packed[4:], unpacked[:3] + unpacked[4:], strict=True):
                torch.testing.assert_close(before[0], after[0])
            answers()
            assert peer.servicer.calls["ForwardMany"] == 6, "remembered: no packed call again"
            loop.run(transport.close())
    finally:
        loop.close()


def test_packed_and_unpacked_backward_calls_give_the_same_gradients():
    loop = LoopThread()
    try:
        with running_peer(experts="ffn.[0:4]", optimizer="none") as peer:
            transport = ExpertTransport()
            torch.manual_seed(0)
            requests = [(f"ffn.{i}", [torch.randn(2, 16), torch.randn(2, 16)], 0) for i in range(4)]
            packed = loop.run(transport.call_many(peer.endpoint, requests, backward=True, timeout=10))
            transport._no_packing.add(peer.endpoint)
            unpacked = loop.run(transport.call_many(peer.endpoint, requests, backward=True, timeout=10))
            for a, b in zip(packed, unpacked, strict=True):
                torch.testing.assert_close(a[0], b[0])
            loop.run(transport.close())
    finally:
        loop.close()


def test_packed_answers_of_many_parts_arrive_in_order():
    loop = LoopThread()
    try:
        with running_peer(experts="ffn.[0:8]") as peer:
            transport = ExpertTransport()
            x = torch.randn(1, 16)
            requests = [(f"ffn.{i % 8}", [x * i], 0) for i in range(MAX_BATCH_PARTS)]

            async def twice():
                return await asyncio.gather(
                    transport.call_many(peer.endpoint, requests, backward=False, timeout=10),
                    transport.call_many(peer.endpoint, requests[:5], backward=False, timeout=10),
                )

            many, few = loop.run(twice())
            assert len(many) == MAX_BATCH_PARTS and all(not isinstance(o, Exception) for o in many)
            for a, b in zip(many[:5], few, strict=True):
                torch.testing.assert_close(a[0], b[0])
            loop.run(transport.close())
    finally:
        loop.close()
