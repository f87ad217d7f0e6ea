"""The wire contract: `proto.contract` and every message's encoder and decoder.

`proto.wire` (Forward/Backward messages as bytes, large lossless tensors without protobuf objects): round trips
(bit-exact, every dtype, both paths), compatibility with protobuf both ways, and hostile bytes. Then the contract
(names match the generated service, no torch needed) and the batch, stream and Info messages.
"""

from __future__ import annotations

import random

import grpc
import pytest
import torch

from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    MAX_NDIM,
    SUPPORTED_DTYPES,
    ExpertStatus,
    Method,
    PartFailure,
    StreamedRequest,
    TensorDecodeError,
    TensorSpec,
    contract,
    decode_batch_request,
    decode_batch_response,
    decode_info_request,
    decode_info_response,
    decode_stream_response,
    deserialize_tensor,
    encode_batch_request,
    encode_batch_response,
    encode_info_request,
    encode_info_response,
    encode_stream_request,
    encode_stream_response,
    expert_pb2,
    serialize_tensor,
    tensor_pb2,
    wire,
)
from proto.wire import (
    RAW_MIN_BYTES,
    RawTensor,
    decode_request,
    decode_response,
    decode_tensor,
    encode_request,
    encode_response,
)
from tests.test_codec import BITS

DTYPES = list(SUPPORTED_DTYPES)
LARGE = (300, 128)  # float32: 150 KiB, over RAW_MIN_BYTES for every dtype but bool (hence LARGE_BOOL)
LARGE_BOOL = (600, 128)


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=generator)
    return (torch.randn(shape, generator=generator) * 10).to(dtype)


def assert_bit_exact(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.dtype == original.dtype and decoded.shape == original.shape
    bits = BITS[original.dtype]
    assert torch.equal(decoded.contiguous().view(bits), original.contiguous().view(bits))


def large_shape(dtype: torch.dtype) -> tuple[int, ...]:
    return LARGE_BOOL if dtype == torch.bool else LARGE


def request_tensors(raw: bytes) -> list[torch.Tensor]:
    return decode_request(raw).tensors()


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_every_dtype_round_trips_bit_exactly_both_ways(dtype, size):
    shape = large_shape(dtype) if size == "large" else (3, 5)
    tensor = make(shape, dtype)
    other = make(shape, dtype, seed=1).t()  # non-contiguous
    raw = encode_request("ffn.3", [tensor, other], response_compression=COMPRESSION_FLOAT16, forward_id=7)
    assert (len(raw) >= RAW_MIN_BYTES) == (size == "large")
    request = decode_request(raw)
    assert (request.uid, request.response_compression, request.forward_id) == ("ffn.3", COMPRESSION_FLOAT16, 7)
    expected_kind = RawTensor if size == "large" else tensor_pb2.Tensor
    assert all(type(part) is expected_kind for part in request.parts)
    first, second = request.tensors()
    assert_bit_exact(first, tensor)
    assert_bit_exact(second, other)
    first_back, second_back = decode_response(encode_response([first, second]))
    assert_bit_exact(first_back, tensor)
    assert_bit_exact(second_back, other)


@pytest.mark.parametrize("size", [8, 40_000])
def test_special_float_bits_survive(size):
    # NaN with payloads and both signs, -0.0, +-Inf, subnormals: as raw bit patterns
    patterns = [0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x3F800000]
    bits = torch.tensor(patterns * (size // len(patterns)), dtype=torch.int64).to(torch.int32)
    fp32 = bits.view(torch.float32)
    bf16_patterns = [0x7FC1, 0xFFA0, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x3F80, 0x7F81]
    bf16 = torch.tensor(bf16_patterns * (size // 8), dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for tensor in (fp32, bf16, fp32.to(torch.float16)):
        (back,) = decode_response(encode_response([tensor]))
        assert_bit_exact(back, tensor)
        (back,) = request_tensors(encode_request("ffn.0", [tensor]))
        assert_bit_exact(back, tensor)


def test_bfloat16_travels_as_its_two_bytes():
    tensor = make((200, 256), torch.bfloat16)  # 100 KiB
    raw = encode_response([tensor])
    assert len(raw) < tensor.numel() * 2 + 200
    payload = tensor.view(torch.int16).numpy().tobytes()
    assert payload in raw  # little-endian, row-major, the tensor's own bytes
    (message,) = expert_pb2.ExpertResponse.FromString(raw).tensors
    assert message.dtype == tensor_pb2.DTYPE_BFLOAT16 and message.buffer == payload


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_zero_d_tensors_alongside_a_large_one(dtype):
    tensors = [make((0, 4), dtype), make((), dtype), make(large_shape(dtype), dtype), make((0,), dtype)]
    raw = encode_request("ffn.0", tensors)
    assert len(raw) >= RAW_MIN_BYTES
    for back, tensor in zip(request_tensors(raw), tensors, strict=True):
        assert_bit_exact(back, tensor)
    for back, tensor in zip(decode_response(encode_response(tensors)), tensors, strict=True):
        assert_bit_exact(back, tensor)


def test_views_slices_expanded_and_negative_views_are_sent_as_their_values():
    base = make((512, 256), torch.float32)
    tensors = [
        base[::2, 1::3],
        base.t(),
        base[0].expand(300, 256),
        torch._neg_view(base),
        base.requires_grad_(True).mul(2),
        make((40, 128), torch.float32).t(),  # small and non-contiguous, in a large message
    ]
    raw = encode_response(tensors)
    for back, tensor in zip(decode_response(raw), tensors, strict=True):
        assert torch.equal(back, tensor.detach().resolve_neg()) and not back.requires_grad


def test_decoded_tensors_are_writable_aligned_and_do_not_alias_each_other():
    tensors = [make((256, 128), torch.float32, seed=i) for i in range(3)] + [make((600, 64), torch.int64)]
    raw = encode_response(tensors)
    decoded = decode_response(raw)
    ranges = []
    for back in decoded:
        assert back.data_ptr() % 16 == 0  # payloads are 64-byte aligned within the message
        ranges.append((back.data_ptr(), back.data_ptr() + back.numel() * back.element_size()))
        back.view(-1)[0] = back.view(-1)[-1]  # writable
        back.zero_()
    ranges.sort()
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False))
    storages = {back.untyped_storage().data_ptr() for back in decoded}
    assert len(storages) == len(decoded)
    assert not any(back.any() for back in decoded)
    # and a second decode of other bytes is unaffected by those writes
    for back, tensor in zip(decode_response(encode_response(tensors)), tensors, strict=True):
        assert torch.equal(back, tensor)


def test_decoded_tensors_keep_the_message_alive():
    tensor = make((256, 256), torch.float32)
    (back,) = decode_response(encode_response([tensor]))
    import gc

    gc.collect()
    assert torch.equal(back.clone(), tensor)


# ------------------------------------------------------------------------------------- protobuf compatibility


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_messages_are_valid_protobuf(dtype, size):
    shape = large_shape(dtype) if size == "large" else (2, 3)
    tensors = [make(shape, dtype), make(shape, dtype, seed=2).t(), make((), dtype)]
    raw = encode_request("ffn.é", tensors, response_compression=COMPRESSION_BLOCKWISE_8BIT, forward_id=2**64 - 1)
    message = expert_pb2.ExpertRequest.FromString(raw)  # what an unchanged peer reads
    assert message.uid == "ffn.é"
    assert message.response_compression == COMPRESSION_BLOCKWISE_8BIT and message.forward_id == 2**64 - 1
    for part, tensor in zip(message.tensors, tensors, strict=True):
        assert_bit_exact(deserialize_tensor(part), tensor)
    response = expert_pb2.ExpertResponse.FromString(encode_response(tensors))
    for part, tensor in zip(response.tensors, tensors, strict=True):
        assert_bit_exact(deserialize_tensor(part), tensor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_protobuf_messages_decode(dtype, size):
    shape = large_shape(dtype) if size == "large" else (2, 3)
    tensors = [make(shape, dtype), make(shape, dtype, seed=3)]
    raw = expert_pb2.ExpertRequest(
        uid="ffn.1", tensors=[serialize_tensor(t) for t in tensors], response_compression=1, forward_id=99
    ).SerializeToString()  # what an unchanged client sends: payloads at no particular alignment
    request = decode_request(raw)
    assert (request.uid, request.response_compression, request.forward_id) == ("ffn.1", 1, 99)
    for back, tensor in zip(request.tensors(), tensors, strict=True):
        assert_bit_exact(back, tensor)
        back.add_(1) if dtype not in (torch.bool,) else back.logical_not_()  # writable
    raw = expert_pb2.ExpertResponse(tensors=[serialize_tensor(t) for t in tensors]).SerializeToString()
    for back, tensor in zip(decode_response(raw), tensors, strict=True):
        assert_bit_exact(back, tensor)


@pytest.mark.parametrize("compression", [COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT])
@pytest.mark.parametrize("size", ["small", "large"])
def test_compressed_tensors_go_through_protobuf_and_match_serialize_tensor(compression, size):
    shape = (600, 256) if size == "large" else (4, 8)
    tensors = [make(shape, torch.float32), make(shape, torch.int64), make(shape, torch.bfloat16)]
    expected = [deserialize_tensor(serialize_tensor(t, compression)) for t in tensors]
    raw = encode_request("ffn.2", tensors, compression=compression, response_compression=compression)
    request = decode_request(raw)
    assert request.response_compression == compression
    for back, want in zip(request.tensors(), expected, strict=True):
        assert_bit_exact(back, want)
    for back, want in zip(decode_response(encode_response(tensors, compression=compression)), expected, strict=True):
        assert_bit_exact(back, want)
    message = expert_pb2.ExpertRequest.FromString(raw)
    for part, want in zip(message.tensors, expected, strict=True):
        assert_bit_exact(deserialize_tensor(part), want)
    # and protobuf's own encoding of the same decodes the same (large: the walk hands these tensors to protobuf)
    raw = expert_pb2.ExpertResponse(tensors=[serialize_tensor(t, compression) for t in tensors]).SerializeToString()
    for back, want in zip(decode_response(raw), expected, strict=True):
        assert_bit_exact(back, want)


def test_small_messages_use_protobuf_objects_and_large_ones_do_not():
    small = encode_request("ffn.0", [make((16, 64), torch.float32)])
    assert (
        small
        == expert_pb2.ExpertRequest(
            uid="ffn.0", tensors=[serialize_tensor(make((16, 64), torch.float32))]
        ).SerializeToString()
    )
    large = encode_request("ffn.0", [make((256, 64), torch.float32)])
    assert type(decode_request(large).parts[0]) is RawTensor
    assert b"\x7a" in large[:64]  # the padding field (15, length-delimited) precedes the buffer


@pytest.mark.parametrize("known", [b"\x08\x05", b"\x10\x05", b"\x1a\x01x", b"\x25\x00\x00\x00\x00"])
def test_a_known_field_with_another_wire_type_is_read_as_protobuf_reads_it(known):
    tensor = make((256, 128), torch.float32)
    raw = encode_request("ffn.0", [tensor], forward_id=9) + known  # protobuf keeps it as an unknown field
    message = expert_pb2.ExpertRequest.FromString(raw)
    request = decode_request(raw)
    assert (request.uid, request.forward_id, request.response_compression) == (
        message.uid,
        message.forward_id,
        message.response_compression,
    )
    (back,) = request.tensors()
    assert torch.equal(back, tensor)
    response = encode_response([tensor]) + b"\x08\x05"
    assert len(expert_pb2.ExpertResponse.FromString(response).tensors) == 1
    (back,) = decode_response(response)
    assert torch.equal(back, tensor)


def test_unusual_but_valid_protobuf_is_still_read():
    tensor = make((300, 128), torch.float32)
    inner = serialize_tensor(tensor).SerializeToString()
    unpacked_shape = b"\x10" + bytes([44]) + b"\x10\x80\x01"  # shape [44, 128] as two unpacked varints
    unknown = b"\xa8\x06\x05" + b"\xb1\x06" + bytes(8) + b"\xbd\x06" + bytes(4)  # fields 101-103: varint, 64, 32
    other = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, buffer=tensor[:44].numpy().tobytes()).SerializeToString()
    raw = (
        unknown
        + b"\x0a\x01x"  # uid "x", then replaced: the last one wins
        + b"\x12"
        + wire._varint(len(inner))
        + inner
        + b"\x0a\x05ffn.0"
        + b"\x12"
        + wire._varint(len(other) + len(unpacked_shape))
        + other
        + unpacked_shape
        + b"\x20\x05\x18\x01"  # forward_id 5, response_compression 1
    )
    message = expert_pb2.ExpertRequest.FromString(raw)
    request = decode_request(raw)
    assert (request.uid, request.forward_id, request.response_compression) == ("ffn.0", 5, 1)
    assert (message.uid, message.forward_id, message.response_compression) == ("ffn.0", 5, 1)
    first, second = request.tensors()
    assert torch.equal(first, tensor) and torch.equal(second, tensor[:44])
    assert [tuple(t.shape) for t in message.tensors] == [(300, 128), (44, 128)]


# ---------------------------------------------------------------------------------------------- hostile bytes


def _tensor_field(fields: bytes, tag: bytes = b"\x12") -> bytes:
    return tag + wire._varint(len(fields)) + fields


def _filler() -> bytes:  # an unknown field that makes a message large enough for the walk
    return b"\x7a" + wire._varint(RAW_MIN_BYTES) + bytes(RAW_MIN_BYTES)


def _large_tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=(1024, 16), buffer: bytes | None = None) -> bytes:
    if buffer is None:
        buffer = bytes(4 * 1024 * 16)
    dims = b"".join(wire._varint(d) for d in shape)
    return (
        b"\x08"
        + wire._varint(dtype)
        + b"\x12"
        + wire._varint(len(dims))
        + dims
        + b"\x22"
        + wire._varint(len(buffer))
        + buffer
    )


def _decode_all(raw: bytes, max_elements: int | None = None) -> None:
    request = decode_request(raw)
    for part in request.parts:
        decode_tensor(part, max_elements=max_elements)


# name -> the message's bytes, given the tag of the tensors field (request b"\x12", response b"\x0a")
HOSTILE = {
    "truncated varint": lambda tag: _filler() + tag + b"\x80",
    "length past the end": lambda tag: _filler() + tag + b"\xff\xff\x03\x08",
    "tensor length past the end": lambda tag: _filler() + _tensor_field(_large_tensor(), tag)[:-5],
    "varint of 11 bytes": lambda tag: _filler() + b"\x20" + b"\xff" * 10 + b"\x01",
    "field number 0": lambda tag: _filler() + b"\x02\x00",
    "wire type 7": lambda tag: _filler() + b"\x0f",
    "wire type 6 in a tensor": lambda tag: _filler() + _tensor_field(b"\x0e", tag),
    "end group without start": lambda tag: _filler() + b"\x0c",
    "buffer as a varint": lambda tag: _filler() + _tensor_field(b"\x08\x01\x20\x05", tag),
    "fixed64 past the end": lambda tag: _filler() + b"\x09\x00\x00",
    "negative dim": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(2**64 - 1024, 16)), tag),
    "dim 2**63": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(2**63, 1)), tag),
    "too many dims": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(1,) * (MAX_NDIM + 1)), tag),
    "huge shape product": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(2**62, 2**62, 2**40)), tag),
    "shape needs more than the buffer": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(1025, 16)), tag),
    "buffer larger than the shape": lambda tag: _filler() + _tensor_field(_large_tensor(shape=(1023, 16)), tag),
    "unknown dtype": lambda tag: _filler() + _tensor_field(_large_tensor(dtype=9), tag),
    "unspecified dtype": lambda tag: _filler() + _tensor_field(_large_tensor(dtype=0), tag),
    "bool bytes other than 0 and 1": lambda tag: (
        _filler()
        + _tensor_field(_large_tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=(70000,), buffer=b"\x02" * 70000), tag)
    ),
    "truncated packed shape": lambda tag: _filler() + _tensor_field(b"\x08\x01\x12\x02\x05\x80", tag),
    "compression out of range": lambda tag: _filler() + _tensor_field(_large_tensor() + b"\x18\x07", tag),
    "scales without 8-bit": lambda tag: _filler() + _tensor_field(_large_tensor() + b"\x2a\x04abcd", tag),
    "chunk of several": lambda tag: _filler() + _tensor_field(_large_tensor() + b"\x38\x03", tag),
}
HOSTILE_REQUESTS = {
    "invalid utf-8 uid": _filler() + b"\x0a\x02\xc3\x28",
    "uid past the end": _filler() + b"\x0a\x05ab",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_malformed_messages_raise_tensor_decode_error(name):
    request, response = HOSTILE[name](b"\x12"), HOSTILE[name](b"\x0a")
    assert len(request) >= RAW_MIN_BYTES and len(response) >= RAW_MIN_BYTES
    with pytest.raises(TensorDecodeError):
        _decode_all(request)
    with pytest.raises(TensorDecodeError):
        decode_response(response)


@pytest.mark.parametrize("name", list(HOSTILE_REQUESTS))
def test_malformed_request_fields_raise_tensor_decode_error(name):
    with pytest.raises(TensorDecodeError):
        decode_request(HOSTILE_REQUESTS[name])


def test_the_shape_is_checked_against_max_elements_before_the_buffer():
    raw = _filler() + _tensor_field(_large_tensor(shape=(50_000_000, 16)))
    (part,) = decode_request(raw).parts
    assert part.shape == (50_000_000, 16)
    with pytest.raises(TensorDecodeError, match="more than the limit of 1600"):
        decode_tensor(part, max_elements=1600)


def test_a_misaligned_payload_is_copied_once_and_still_correct():
    tensor = make((200, 128), torch.float32)
    inner = serialize_tensor(tensor).SerializeToString()
    for shift in range(1, 8):
        raw = b"\x7a" + bytes([shift - 1]) + bytes(shift - 1) + b"\x12" + wire._varint(len(inner)) + inner
        (back,) = decode_request(raw).tensors()
        assert torch.equal(back, tensor) and back.data_ptr() % 4 == 0


def test_non_bytes_input_is_decoded_from_a_copy_and_other_objects_refused():
    tensor = make((256, 128), torch.float32)
    buffer = bytearray(encode_response([tensor]))
    (back,) = decode_response(buffer)
    buffer[:] = bytes(len(buffer))
    assert torch.equal(back, tensor)
    with pytest.raises(TensorDecodeError):
        decode_response("not bytes")
    with pytest.raises(TensorDecodeError):
        decode_request(None)


def _protobuf_outcome(raw: bytes, response: bool):
    """What protobuf + `deserialize_tensor` make of ``raw``: ("ok", fields, tensors) or ("error",)."""
    try:
        if response:
            return "ok", (), [deserialize_tensor(p) for p in expert_pb2.ExpertResponse.FromString(raw).tensors]
        message = expert_pb2.ExpertRequest.FromString(raw)
        fields = (message.uid, message.forward_id, message.response_compression)
        return "ok", fields, [deserialize_tensor(p) for p in message.tensors]
    except Exception:
        return ("error",)


def _wire_outcome(raw: bytes, response: bool):
    try:  # anything but TensorDecodeError fails the test
        if response:
            return "ok", (), decode_response(raw)
        request = decode_request(raw)
        return "ok", (request.uid, request.forward_id, request.response_compression), request.tensors()
    except TensorDecodeError:
        return ("error",)


def test_flipped_and_truncated_large_messages_decode_exactly_as_protobuf_decodes_them():
    rng = random.Random(0)
    tensors = [make((200, 96), torch.float32), make((40, 96), torch.bfloat16).t(), make((300,), torch.bool)]
    messages = [
        (encode_request("ffn.0", tensors, forward_id=3), False),
        (encode_response(tensors), True),
        (
            expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(t) for t in tensors]).SerializeToString(),
            False,
        ),
    ]
    outcomes = {"ok": 0, "error": 0}
    for case in range(400):
        message, response = messages[case % len(messages)]
        payload = bytearray(message)
        if case % 4 == 0:
            del payload[rng.randrange(1, len(payload)) :]
        for _ in range(rng.randrange(1, 4)):
            if case % 2:  # where the headers are: the start, and the last tensors' fields
                position = rng.randrange(80) if rng.random() < 0.5 else rng.randrange(len(payload) - 2000, len(payload))
            else:
                position = rng.randrange(len(payload))
            payload[position] = rng.randrange(256)
        raw = bytes(payload)
        expected, got = _protobuf_outcome(raw, response), _wire_outcome(raw, response)
        assert got[0] == expected[0], f"case {case}: protobuf {expected[0]}, wire {got[0]}"
        outcomes[got[0]] += 1
        if got[0] == "ok":
            assert got[1] == expected[1]
            assert len(got[2]) == len(expected[2])
            for ours, theirs in zip(got[2], expected[2], strict=True):
                assert_bit_exact(ours, theirs)
    assert outcomes["ok"] > 20 and outcomes["error"] > 20, outcomes


def test_encoding_refuses_what_serialize_tensor_refuses():
    large = make((256, 256), torch.float32)
    with pytest.raises(TypeError):
        encode_request("ffn.0", [large, "not a tensor"])
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_response([large, large.double()])
    with pytest.raises(ValueError, match="unknown compression"):
        encode_response([large], compression=9)
    with pytest.raises(ValueError, match="NaN"):
        encode_response([large, torch.full((4,), float("nan"))], compression=COMPRESSION_FLOAT16)
    with pytest.raises(ValueError):
        encode_request("ffn.0", [large], forward_id=-1)
    with pytest.raises(ValueError):
        encode_request("ffn.0", [make((2, 2), torch.float32)], forward_id=2**64)


def test_large_message_is_protobufs_own_encoding_plus_the_padding_fields():
    tensors = [make((256, 128), torch.float32), make((3,), torch.int64), make((100, 300), torch.bfloat16).t()]
    raw = encode_request("ffn.0", tensors, forward_id=1, response_compression=2)
    reference = expert_pb2.ExpertRequest(
        uid="ffn.0", tensors=[serialize_tensor(t) for t in tensors], forward_id=1, response_compression=2
    ).SerializeToString()
    reparsed = expert_pb2.ExpertRequest.FromString(raw)
    reparsed.DiscardUnknownFields()  # the padding fields
    assert reparsed.SerializeToString() == reference
    assert len(raw) - len(reference) <= len(tensors) * (2 + wire.ALIGN + 2)


# ------------------------------------------------------------------------------------------------ end to end


def test_a_peer_serves_large_requests_through_the_raw_path_and_refuses_bad_ones():
    import asyncio

    import grpc

    from router_client.transport import ExpertTransport
    from tests.conftest import running_peer

    with running_peer(hidden_dim=64, max_batch_size=4096) as peer:
        backend = peer.backends["ffn.0"]
        x = make((1024, 64), torch.float32)  # 256 KiB: raw both ways
        reference = backend.forward([x])[0]

        async def calls():
            transport = ExpertTransport()
            try:
                (out,) = await transport.call(peer.endpoint, "ffn.0", [x], backward=False, timeout=30)
                torch.testing.assert_close(out, reference)
                transport.compression = COMPRESSION_FLOAT16  # lossy both ways: protobuf tensors
                (half,) = await transport.call(peer.endpoint, "ffn.0", [x], backward=False, timeout=30)
                torch.testing.assert_close(half, reference, atol=1e-2, rtol=1e-2)
                transport.compression = 0
                (grad,) = await transport.call(
                    peer.endpoint, "ffn.1", [x, torch.randn(1024, 64)], backward=True, timeout=30, forward_id=5
                )
                assert grad.shape == x.shape and bool(torch.isfinite(grad).all())
            finally:
                await transport.close()

        asyncio.run(calls())
        assert peer.backends["ffn.1"].update_count == 1

        with grpc.insecure_channel(peer.endpoint) as channel:
            call = channel.unary_unary(Method.FORWARD.path)

            def status(raw: bytes) -> grpc.StatusCode:
                try:
                    call(raw, timeout=10)
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    assert exc.details()
                    return exc.code()

            good = encode_request("ffn.0", [x])
            header = good.index(x.numpy().tobytes()[:64])
            uid = b"\x0a\x05ffn.0"
            bad = {
                "wrong shape": (encode_request("ffn.0", [make((1024, 63), torch.float32)]), "INVALID_ARGUMENT"),
                "wrong dtype": (encode_request("ffn.0", [make((1024, 64), torch.int64)]), "INVALID_ARGUMENT"),
                "too many tokens": (encode_request("ffn.0", [make((5000, 64), torch.float32)]), "RESOURCE_EXHAUSTED"),
                "huge declared shape": (
                    uid + _filler() + _tensor_field(_large_tensor(shape=(50_000_000, 64))),
                    "RESOURCE_EXHAUSTED",
                ),
                "size mismatch": (uid + _filler() + _tensor_field(_large_tensor(shape=(300, 64))), "INVALID_ARGUMENT"),
                "truncated": (good[: len(good) // 2], "INVALID_ARGUMENT"),
                "unknown uid": (encode_request("ffn.9", [x]), "NOT_FOUND"),
            }
            for name, (raw, code) in bad.items():
                assert len(raw) >= RAW_MIN_BYTES
                assert status(raw).name == code, name
            rng = random.Random(1)
            for _ in range(40):  # mutated headers of a large request: a status code every time
                payload = bytearray(good)
                payload[rng.randrange(header)] = rng.randrange(256)
                assert status(bytes(payload)).name in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED")
            # an unchanged (protobuf) client gets protobuf it can read, and the peer is still healthy
            answer = expert_pb2.ExpertResponse.FromString(
                call(expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x)]).SerializeToString())
            )
            torch.testing.assert_close(deserialize_tensor(answer.tensors[0]), reference)


# ------------------------------------------------------------------------------------------------- contract


def test_the_contract_names_every_method_of_the_generated_service_and_its_kind():
    service = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
    assert contract.SERVICE_NAME == service.full_name == "dmoe.v1.ExpertService"
    assert [m.value for m in Method] == [m.name for m in service.methods]
    for descriptor in service.methods:
        method = Method(descriptor.name)
        assert method.streaming == descriptor.client_streaming
        assert (method.streaming or method.streams_answers) == descriptor.server_streaming
        assert method.batched == (descriptor.input_type.name == "ExpertRequestBatch")
        assert method.path == f"/dmoe.v1.ExpertService/{descriptor.name}" == contract.method_path(descriptor.name)
        assert Method.from_path(method.path) is method
    assert Method.from_path("/grpc.health.v1.Health/Check") is None
    assert Method.from_path(f"/{contract.SERVICE_NAME}/Nope") is None
    assert (Method.unary(True), Method.stream(False), Method.many(True)) == (
        Method.BACKWARD,
        Method.FORWARD_STREAM,
        Method.BACKWARD_MANY,
    )
    assert Method.BACKWARD_STREAM.backward and not Method.FORWARD_MANY.backward and not Method.INFO.backward
    assert all(prefix.startswith(f"/{contract.HEALTH_SERVICE}/") for prefix in contract.OPEN_SERVICES)


def test_the_contract_and_the_health_check_import_without_torch():
    import subprocess
    import sys

    code = "import sys, proto.contract, dmoe_cli.healthcheck; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_full_batch_of_coalesced_requests_fits_in_one_message():
    limit = contract.MAX_BATCH_PARTS * contract.COALESCE_BYTES
    assert contract.fits_one_message(limit, contract.DEFAULT_MAX_MESSAGE_BYTES)


# -------------------------------------------------------------------------------------- batches, streams, Info


def test_a_batch_request_round_trips_part_by_part():
    x, y = make((3, 16), torch.float32), make((2, 4), torch.bfloat16)
    raw = encode_batch_request(
        [("ffn.0", [x], 0), ("ffn.1", [x, y], 9)], compression=0, response_compression=COMPRESSION_FLOAT16
    )
    first, second = decode_batch_request(raw)
    assert (first.uid, first.forward_id, second.uid, second.forward_id) == ("ffn.0", 0, "ffn.1", 9)
    assert first.response_compression == second.response_compression == COMPRESSION_FLOAT16
    assert_bit_exact(first.tensors()[0], x)
    assert [t.dtype for t in second.tensors()] == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="1 to"):
        encode_batch_request([])
    with pytest.raises(ValueError, match="1 to"):
        encode_batch_request([("ffn.0", [x], 0)] * (contract.MAX_BATCH_PARTS + 1))


def test_a_batch_response_carries_tensors_or_a_status_per_part():
    x = make((3, 16), torch.float32)
    failure = PartFailure(grpc.StatusCode.NOT_FOUND, "no ffn.9 here")
    raw = encode_batch_response([[x], failure, [x]], compressions=[0, 0, COMPRESSION_FLOAT16])
    ok, failed, half = decode_batch_response(raw, 3)
    assert ok.failure is None and failed.failure == failure and half.failure is None
    assert_bit_exact(ok.tensors()[0], x)
    torch.testing.assert_close(half.tensors()[0], x, atol=1e-2, rtol=1e-3)
    with pytest.raises(TensorDecodeError, match="3 results for 2 requests"):
        decode_batch_response(raw, 2)
    unknown = expert_pb2.ExpertResponseBatch(results=[expert_pb2.ExpertResult(code=999, message="?")])
    (result,) = decode_batch_response(unknown.SerializeToString(), 1)
    assert result.failure == PartFailure(grpc.StatusCode.UNKNOWN, "?")
    bad = expert_pb2.ExpertResponseBatch(
        results=[expert_pb2.ExpertResult(response=expert_pb2.ExpertResponse(tensors=[tensor_pb2.Tensor(dtype=1)]))]
    )
    (result,) = decode_batch_response(bad.SerializeToString(), 1)
    with pytest.raises(TensorDecodeError):  # a part's bad tensors fail that part alone, when it is read
        result.tensors()


@pytest.mark.parametrize("name", ["garbage", "empty", "too many parts"])
def test_malformed_batch_requests_raise_tensor_decode_error(name):
    one = expert_pb2.ExpertRequest(uid="ffn.0")
    raw = {
        "garbage": b"\xff\xff\xff\xff garbage",
        "empty": b"",
        "too many parts": expert_pb2.ExpertRequestBatch(
            requests=[one] * (contract.MAX_BATCH_PARTS + 1)
        ).SerializeToString(),
    }[name]
    with pytest.raises(TensorDecodeError):
        decode_batch_request(raw)
    with pytest.raises(TensorDecodeError):
        decode_batch_response(b"\xff\xff\xff\xff garbage", 1)


def test_a_stream_request_and_response_round_trip_in_chunks():
    x, y = make((300, 128), torch.float32), make((7, 3), torch.int64)
    messages = list(encode_stream_request("ffn.2", [x, y], chunk_bytes=10_000, response_compression=1, forward_id=4))
    assert len(messages) > 10 and all(len(raw) < 10_100 for raw in messages)
    stream = StreamedRequest()
    for raw in messages:
        stream.add(raw)
    assert stream.received == sum(map(len, messages))
    request = stream.finish()
    assert (request.uid, request.response_compression, request.forward_id) == ("ffn.2", 1, 4)
    decoded = request.tensors()
    assert_bit_exact(decoded[0], x)
    assert_bit_exact(decoded[1], y)
    responses = list(encode_stream_response([x, y], chunk_bytes=10_000))
    assert len(responses) > 10
    out = decode_stream_response(responses)
    assert_bit_exact(out[0], x)
    assert_bit_exact(out[1], y)


def test_malformed_streams_raise_tensor_decode_error():
    with pytest.raises(TensorDecodeError, match="empty request stream"):
        StreamedRequest().finish()
    with pytest.raises(TensorDecodeError):
        StreamedRequest().add(b"\xff\xff\xff\xff garbage")
    messages = list(encode_stream_request("ffn.0", [make((300, 128), torch.float32)], chunk_bytes=10_000))
    stream = StreamedRequest()
    for raw in messages[:-1]:  # the last chunk never arrives
        stream.add(raw)
    with pytest.raises(TensorDecodeError, match="bad tensor chunks"):
        stream.finish()
    with pytest.raises(TensorDecodeError):
        decode_stream_response(list(encode_stream_response([make((300, 128), torch.float32)], chunk_bytes=10_000))[1:])
    with pytest.raises(ValueError):  # what serialize_tensor refuses, before the first message
        encode_stream_request("ffn.0", [torch.tensor([float("nan")])], chunk_bytes=8, compression=COMPRESSION_FLOAT16)


def test_info_round_trips_as_typed_records():
    status = ExpertStatus(
        uid="ffn.3",
        expert_cls="ffn",
        inputs=(TensorSpec((-1, 16), torch.float32),),
        outputs=(TensorSpec((-1, 16), torch.bfloat16),),
        num_parameters=1234,
        update_count=5,
        updates_skipped=1,
        max_batch_size=64,
        queue_size=2,
        tokens_per_second=12.5,
        batches_processed=7,
        requests_expired=3,
    )
    assert decode_info_request(encode_info_request("ffn.3")) == "ffn.3"
    assert decode_info_request(encode_info_request()) == ""
    assert decode_info_response(encode_info_response([status, status], "QmPeer")) == ([status, status], "QmPeer")
    for decode in (decode_info_request, decode_info_response):
        with pytest.raises(TensorDecodeError):
            decode(b"\xff\xff\xff\xff garbage")
