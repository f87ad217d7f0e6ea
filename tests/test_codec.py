"""The tensor codec: lossless round trips, lossy error bounds, validation of hostile messages, chunking."""

from __future__ import annotations

import math
import re
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    DTYPE_FLOAT32,
    DTYPE_UNSPECIFIED,
    SUPPORTED_DTYPES,
    TensorDecodeError,
    TensorDescriptor,
    deserialize_tensor,
    encoded_size,
    iter_tensors_from_chunks,
    join_tensor_chunks,
    serialize_tensor,
    split_tensor,
    tensor_pb2,
)

DTYPES = list(SUPPORTED_DTYPES)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Same-size integer views, to compare tensors bit for bit (NaN payloads and -0.0 included).
BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int64: torch.int64,
    torch.bool: torch.bool,
}


def assert_bit_exact(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.device.type == "cpu"
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    bits = BITS[original.dtype]
    assert torch.equal(decoded.contiguous().view(bits), original.cpu().contiguous().view(bits))


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose bytes are exactly ``data`` (any bit pattern: NaN payloads, -0.0, inf)."""
    if dtype == torch.bool:
        data = bytes(b & 1 for b in data)
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


@st.composite
def any_tensor(draw, dtypes=DTYPES) -> torch.Tensor:
    """Any bit pattern of any dtype, 0-d to 4-d, zero-size dims included, often non-contiguous."""
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    nbytes = math.prod(shape) * dtype.itemsize
    tensor = tensor_from_bytes(draw(st.binary(min_size=nbytes, max_size=nbytes)), shape, dtype)
    view = draw(st.sampled_from(["plain", "transpose", "step", "expand"]))
    if view == "transpose" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    elif view == "step" and tensor.dim() >= 1:
        tensor = tensor[::2]
    elif view == "expand":
        tensor = tensor.unsqueeze(0).expand(3, *tensor.shape)
    return tensor


# ---------------------------------------------------------------------------------------------
# lossless


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_tensor())
def test_lossless_round_trip_is_bit_exact_for_every_dtype_and_shape(tensor):
    message = serialize_tensor(tensor)
    assert message.compression == COMPRESSION_NONE
    assert message.chunks == 0
    assert list(message.shape) == list(tensor.shape)
    decoded = deserialize_tensor(message)
    assert_bit_exact(decoded, tensor)
    # A message that went over the wire decodes the same.
    assert_bit_exact(deserialize_tensor(tensor_pb2.Tensor.FromString(message.SerializeToString())), tensor)


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_float_values_survive_bit_exactly(dtype):
    values = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -3.5], dtype=torch.float32)
    tensor = values.to(dtype)
    assert_bit_exact(deserialize_tensor(serialize_tensor(tensor)), tensor)


def test_nan_payloads_survive_bit_exactly():
    patterns = [0x7FC00001, 0xFFC12345, 0x7F800001, 0xFFFFFFFF]  # quiet/signalling NaNs, odd payloads
    tensor = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert_bit_exact(deserialize_tensor(serialize_tensor(tensor)), tensor)


def test_wire_bytes_are_little_endian_and_bfloat16_stays_two_bytes():
    message = serialize_tensor(torch.tensor([1.0, -2.0], dtype=torch.float32))
    assert message.buffer == struct.pack("<2f", 1.0, -2.0)
    bf16 = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    message = serialize_tensor(bf16)
    assert message.buffer == struct.pack("<2H", 0x3F80, 0xC000)  # the top 16 bits of the float32s
    assert message.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert serialize_tensor(torch.tensor([7, -1])).buffer == struct.pack("<2q", 7, -1)
    assert serialize_tensor(torch.tensor([True, False])).buffer == b"\x01\x00"


def test_zero_d_and_zero_size_tensors():
    scalar = torch.tensor(2.5)
    decoded = deserialize_tensor(serialize_tensor(scalar))
    assert decoded.shape == () and decoded.item() == 2.5
    empty = torch.empty(3, 0, 2, dtype=torch.bfloat16)
    message = serialize_tensor(empty)
    assert message.buffer == b""
    assert deserialize_tensor(message).shape == (3, 0, 2)
    for compression in (COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT):
        assert deserialize_tensor(serialize_tensor(torch.empty(0, 4), compression)).shape == (0, 4)


def test_tensor_requiring_grad_is_sent_as_its_values():
    weight = torch.randn(3, 4, requires_grad=True)
    decoded = deserialize_tensor(serialize_tensor(weight * 2))
    assert not decoded.requires_grad
    assert torch.equal(decoded, (weight * 2).detach())


def test_decoded_tensor_is_writable_and_owns_its_memory():
    original = torch.arange(4096, dtype=torch.float32)
    message = serialize_tensor(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "buffer is not writable" warning either
        first = deserialize_tensor(message)
        first.mul_(-1)
        second = deserialize_tensor(message)
    assert torch.equal(second, original)
    assert torch.equal(first, -original)
    assert message.buffer == original.numpy().tobytes()


def test_unsupported_input_is_refused_at_encode():
    with pytest.raises(ValueError, match="unsupported dtype"):
        serialize_tensor(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown compression"):
        serialize_tensor(torch.zeros(2), compression=7)
    with pytest.raises(ValueError, match="block_size"):
        serialize_tensor(torch.zeros(2), COMPRESSION_BLOCKWISE_8BIT, block_size=0)
    with pytest.raises(ValueError, match="strided"):
        serialize_tensor(torch.eye(3).to_sparse())
    with pytest.raises(TypeError):
        serialize_tensor([1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compression", [COMPRESSION_NONE, COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT])
def test_cuda_tensors_are_encoded_from_the_gpu_and_decoded_on_the_cpu(compression):
    tensor = torch.randn(33, 65, device="cuda")
    message = serialize_tensor(tensor, compression)
    assert message.compression == compression
    decoded = deserialize_tensor(message)
    assert decoded.device.type == "cpu" and decoded.shape == tensor.shape
    original = tensor.cpu()
    error = (decoded.double() - original.double()).abs()
    if compression == COMPRESSION_NONE:
        assert_bit_exact(decoded, original)
    elif compression == COMPRESSION_FLOAT16:
        assert (error <= original.double().abs() * 2**-11 + 2**-25).all()
    else:
        assert (error.view(-1) <= blockwise_error_bound(original, 64)).all()


# ---------------------------------------------------------------------------------------------
# lossy


def test_lossy_compression_falls_back_to_none_where_it_does_not_apply():
    for tensor in (torch.arange(5), torch.tensor([True, False])):
        for compression in (COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT):
            message = serialize_tensor(tensor, compression)
            assert message.compression == COMPRESSION_NONE
            assert_bit_exact(deserialize_tensor(message), tensor)
    for dtype in (torch.float16, torch.bfloat16):  # already 2 bytes: float16 compression is pointless
        tensor = torch.randn(10).to(dtype)
        message = serialize_tensor(tensor, COMPRESSION_FLOAT16)
        assert message.compression == COMPRESSION_NONE
        assert_bit_exact(deserialize_tensor(message), tensor)


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=200))
def test_float16_error_is_within_2_to_the_minus_11_relative_and_saturates(values):
    tensor = torch.tensor(values, dtype=torch.float32)
    message = serialize_tensor(tensor, COMPRESSION_FLOAT16)
    assert message.compression == COMPRESSION_FLOAT16
    assert len(message.buffer) == 2 * tensor.numel()
    decoded = deserialize_tensor(message)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    x, y = tensor.double(), decoded.double()
    normal = (x.abs() >= 2**-14) & (x.abs() <= 65504)
    assert ((x - y).abs() <= x.abs() * 2**-11)[normal].all()
    assert ((x - y).abs() <= 2**-25)[x.abs() < 2**-14].all()
    assert (y == x.sign() * 65504)[x.abs() > 65520].all()


def test_float16_saturates_instead_of_overflowing_to_inf():
    tensor = torch.tensor([1e5, -1e6, 65504.0, 65519.0, 65520.0, -3e38])
    decoded = deserialize_tensor(serialize_tensor(tensor, COMPRESSION_FLOAT16))
    assert decoded.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 65504.0, -65504.0]


def blockwise_error_bound(tensor: torch.Tensor, block_size: int) -> torch.Tensor:
    """absmax/254 of each element's block, plus a few float32 ulps of absmax and of the smallest subnormal."""
    flat = tensor.double().reshape(-1)
    pad = (-flat.numel()) % block_size
    absmax = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size).abs().amax(dim=1)
    per_block = absmax / 254 + absmax * 2**-20 + 2**-148
    return per_block.repeat_interleave(block_size)[: flat.numel()]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(finite_floats, min_size=1, max_size=300),
    st.sampled_from([1, 3, 7, 64, 100, 512]),
)
def test_blockwise_8bit_error_is_at_most_absmax_over_254(values, block_size):
    tensor = torch.tensor(values, dtype=torch.float32)
    message = serialize_tensor(tensor, COMPRESSION_BLOCKWISE_8BIT, block_size=block_size)
    assert message.compression == COMPRESSION_BLOCKWISE_8BIT
    assert message.block_size == block_size
    assert len(message.buffer) == tensor.numel()
    assert len(message.scales) == 4 * math.ceil(tensor.numel() / block_size)
    decoded = deserialize_tensor(message)
    assert decoded.dtype == torch.float32
    error = (decoded.double() - tensor.double()).abs()
    assert (error <= blockwise_error_bound(tensor, block_size)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blockwise_8bit_decodes_half_precision_back_to_its_dtype(dtype):
    tensor = (torch.randn(3, 100) * 10).to(dtype)
    message = serialize_tensor(tensor, COMPRESSION_BLOCKWISE_8BIT)
    assert message.compression == COMPRESSION_BLOCKWISE_8BIT
    decoded = deserialize_tensor(message)
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11  # rounding of the output dtype, relative
    bound = blockwise_error_bound(tensor, 64).view(tensor.shape) + decoded.double().abs() * ulp
    assert ((decoded.double() - tensor.double()).abs() <= bound).all()


def test_blockwise_8bit_handles_zero_blocks_tiny_scales_and_huge_scales():
    tiny_and_huge = torch.tensor([1e-38, -2e-38, 3.4e38, -3e38, 1.0])
    tensor = torch.cat([torch.zeros(64), torch.full((64,), 1e-45), tiny_and_huge[:2], tiny_and_huge[2:]])
    decoded = deserialize_tensor(serialize_tensor(tensor, COMPRESSION_BLOCKWISE_8BIT))
    assert torch.equal(decoded[:64], torch.zeros(64))
    assert torch.isfinite(decoded).all()  # code * absmax would overflow near the float32 maximum
    assert ((decoded.double() - tensor.double()).abs() <= blockwise_error_bound(tensor, 64)).all()


@pytest.mark.parametrize("compression", [COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_lossy_compression_refuses_nan_and_inf_at_encode(compression, bad):
    tensor = torch.ones(200)
    tensor[150] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*COMPRESSION_NONE"):
        serialize_tensor(tensor, compression)


# ---------------------------------------------------------------------------------------------
# validation of what arrives


def good_message(**fields) -> tensor_pb2.Tensor:
    message = serialize_tensor(torch.arange(6, dtype=torch.float32).view(2, 3))
    for name, value in fields.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)
        else:
            setattr(message, name, value)
    return message


def good_8bit(**fields) -> tensor_pb2.Tensor:
    message = serialize_tensor(torch.randn(130), COMPRESSION_BLOCKWISE_8BIT)  # 3 blocks of 64
    for name, value in fields.items():
        setattr(message, name, value)
    return message


MALFORMED = {
    "unspecified dtype": (good_message(dtype=DTYPE_UNSPECIFIED), "DTYPE_UNSPECIFIED"),
    "unknown dtype": (good_message(dtype=99), "unknown dtype 99"),
    "unknown compression": (good_message(compression=42), "unknown compression 42"),
    "negative dim": (good_message(shape=[-1, 3]), "negative"),
    "too many dims": (good_message(shape=[1] * 65), "dimensions"),
    "element count overflows": (good_message(shape=[2**62, 2**62, 4]), "int64"),
    "buffer too short": (good_message(buffer=b"\0" * 12), "buffer has 12 bytes but shape [2, 3] of float32 needs 24"),
    "buffer too long": (good_message(buffer=b"\0" * 28), "needs 24"),
    "buffer for empty shape": (good_message(shape=[0, 3]), "buffer has 24 bytes"),
    "split message": (good_message(chunks=2), "join"),
    "lossy int64": (
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[1], buffer=b"\0" * 2, compression=1),
        "does not apply",
    ),
    "float16 buffer length": (good_message(compression=COMPRESSION_FLOAT16), "as float16 needs 12"),
    "block_size without 8-bit": (good_message(block_size=64), "block_size"),
    "scales without 8-bit": (good_message(scales=b"\0" * 4), "scales"),
    "8-bit block_size 0": (good_8bit(block_size=0), "block_size is 0"),
    "8-bit codes too short": (good_8bit(buffer=b"\0" * 129), "as int8 needs 130"),
    "8-bit scales too short": (good_8bit(scales=b"\0" * 8), "need 3 float32 scales"),
    "8-bit scales wrong block_size": (good_8bit(block_size=32), "need 5 float32 scales"),
    "8-bit nan scale": (good_8bit(scales=struct.pack("<3f", 1.0, math.nan, 1.0)), "finite"),
    "8-bit negative scale": (good_8bit(scales=struct.pack("<3f", 1.0, -1.0, 1.0)), "non-negative"),
    "bool byte 2": (
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[3], buffer=b"\x01\x02\x00"),
        "bool",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_raises_tensor_decode_error(case):
    message, match = MALFORMED[case]
    with pytest.raises(TensorDecodeError, match=re.escape(match)):
        deserialize_tensor(message)
    # The same holds after a trip over the wire (unknown enum values included).
    with pytest.raises(TensorDecodeError, match=re.escape(match)):
        deserialize_tensor(tensor_pb2.Tensor.FromString(message.SerializeToString()))


def test_max_elements_is_checked_before_the_buffer():
    huge = tensor_pb2.Tensor(dtype=DTYPE_FLOAT32, shape=[10**6, 10**6])  # no buffer at all
    with pytest.raises(TensorDecodeError, match="more than the limit of 1000"):
        deserialize_tensor(huge, max_elements=1000)
    assert deserialize_tensor(good_message(), max_elements=6).shape == (2, 3)
    with pytest.raises(TensorDecodeError, match="limit of 5"):
        deserialize_tensor(good_message(), max_elements=5)


def test_not_a_tensor_message_is_a_decode_error():
    with pytest.raises(TensorDecodeError):
        deserialize_tensor(b"not a message")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_wire_bytes_never_raise_anything_but_tensor_decode_error(data):
    try:
        message = tensor_pb2.Tensor.FromString(data)
    except Exception:  # not even protobuf: never reaches the codec
        return
    try:
        deserialize_tensor(message, max_elements=10**6)
    except TensorDecodeError:
        pass


def test_tensor_decode_error_is_a_value_error():
    assert issubclass(TensorDecodeError, ValueError)


# ---------------------------------------------------------------------------------------------
# descriptor, size


def test_tensor_descriptor_describes_and_makes_zeros():
    tensor = torch.randn(2, 5).to(torch.bfloat16)
    descriptor = TensorDescriptor.from_tensor(tensor, COMPRESSION_FLOAT16)
    assert descriptor == TensorDescriptor((2, 5), torch.bfloat16, COMPRESSION_FLOAT16)
    zeros = descriptor.make_zeros()
    assert zeros.shape == (2, 5) and zeros.dtype == torch.bfloat16 and not zeros.any()
    assert TensorDescriptor([3], torch.int64).shape == (3,)
    with pytest.raises(AttributeError):
        descriptor.shape = (1,)
    with pytest.raises(ValueError):
        TensorDescriptor((2,), torch.int32)
    with pytest.raises(ValueError):
        TensorDescriptor((-1,), torch.float32)


def test_encoded_size_counts_buffer_and_scales():
    assert encoded_size(serialize_tensor(torch.zeros(10))) == 40
    assert encoded_size(serialize_tensor(torch.zeros(130), COMPRESSION_BLOCKWISE_8BIT)) == 130 + 3 * 4
    assert encoded_size(serialize_tensor(torch.zeros(10), COMPRESSION_FLOAT16)) == 20


# ---------------------------------------------------------------------------------------------
# chunking


def test_a_tensor_that_fits_is_yielded_unchanged():
    message = serialize_tensor(torch.randn(16))
    chunks = list(split_tensor(message, 64))
    assert len(chunks) == 1 and chunks[0] is message and chunks[0].chunks == 0
    assert join_tensor_chunks(chunks) is message


def test_split_puts_metadata_and_scales_in_the_first_chunk_only():
    tensor = torch.randn(1000)
    message = serialize_tensor(tensor, COMPRESSION_BLOCKWISE_8BIT)  # 1000 codes + 16 scales * 4
    chunks = list(split_tensor(message, 300))
    first, rest = chunks[0], chunks[1:]
    assert first.chunks == len(chunks) == 4  # 236 + 300 + 300 + 164
    assert first.scales == message.scales and list(first.shape) == [1000]
    assert first.compression == COMPRESSION_BLOCKWISE_8BIT and first.block_size == 64
    assert all(encoded_size(chunk) <= 300 for chunk in chunks)
    for chunk in rest:
        assert chunk.buffer and not chunk.scales and not chunk.shape and chunk.chunks == 0
        assert chunk.dtype == DTYPE_UNSPECIFIED and chunk.compression == COMPRESSION_NONE
    joined = join_tensor_chunks(chunks)
    assert joined == message
    assert torch.equal(deserialize_tensor(joined), deserialize_tensor(message))


def test_scales_larger_than_a_chunk_go_alone_in_the_first_chunk():
    message = serialize_tensor(torch.randn(100), COMPRESSION_BLOCKWISE_8BIT, block_size=1)  # 400 B scales
    chunks = list(split_tensor(message, 64))
    assert chunks[0].buffer == b"" and len(chunks[0].scales) == 400
    assert all(len(chunk.buffer) <= 64 for chunk in chunks)
    assert join_tensor_chunks(chunks) == message


@settings(max_examples=100, deadline=None)
@given(any_tensor(), st.integers(1, 100))
def test_split_then_join_is_identity(tensor, chunk_bytes):
    message = serialize_tensor(tensor)
    chunks = list(split_tensor(message, chunk_bytes))
    assert all(len(chunk.buffer) <= chunk_bytes for chunk in chunks)
    assert max(chunks[0].chunks, 1) == len(chunks)
    # Chunks travel as separate messages.
    wire = [tensor_pb2.Tensor.FromString(chunk.SerializeToString()) for chunk in chunks]
    assert_bit_exact(deserialize_tensor(join_tensor_chunks(wire)), tensor)


def test_join_refuses_a_wrong_chunk_count():
    chunks = list(split_tensor(serialize_tensor(torch.randn(100)), 128))
    assert len(chunks) == 4
    with pytest.raises(TensorDecodeError, match="ended after 3 of 4"):
        join_tensor_chunks(chunks[:3])
    with pytest.raises(TensorDecodeError, match="more chunks"):
        join_tensor_chunks([*chunks, tensor_pb2.Tensor(buffer=b"x")])
    with pytest.raises(TensorDecodeError, match="no chunks"):
        join_tensor_chunks([])
    with pytest.raises(TensorDecodeError, match="only the first chunk"):
        join_tensor_chunks([chunks[0], chunks[0], *chunks[2:]])
    with pytest.raises(TensorDecodeError, match="limit of 300 bytes"):
        join_tensor_chunks(chunks, max_bytes=300)
    with pytest.raises(ValueError, match="already"):
        split_tensor(chunks[0], 128)  # refused at the call, before iteration
    with pytest.raises(ValueError, match="positive"):
        split_tensor(serialize_tensor(torch.randn(3)), 0)


def test_a_stream_of_several_chunked_tensors_comes_back_whole_and_in_order():
    tensors = [
        torch.randn(300, 7),
        torch.tensor(1.5),  # fits: travels whole
        torch.arange(1000),
        torch.empty(0, 5),
        torch.randn(500).to(torch.bfloat16),
    ]
    stream = [chunk for tensor in tensors for chunk in split_tensor(serialize_tensor(tensor), 1024)]
    stream += split_tensor(serialize_tensor(torch.randn(2000), COMPRESSION_BLOCKWISE_8BIT), 1024)
    assert len(stream) > len(tensors) + 1
    decoded = [deserialize_tensor(message) for message in iter_tensors_from_chunks(iter(stream))]
    for got, want in zip(decoded[:-1], tensors, strict=True):
        assert_bit_exact(got, want)
    assert decoded[-1].shape == (2000,)
    with pytest.raises(TensorDecodeError, match="stream ended"):
        list(iter_tensors_from_chunks(stream[:-1]))


@pytest.mark.slow
def test_256_mib_tensor_round_trips_through_4_mib_chunks_bit_exactly():
    numel = 64 * 2**20  # float32: 256 MiB
    tensor = torch.randint(-(2**31), 2**31 - 1, (numel,), dtype=torch.int32).view(torch.float32)
    message = serialize_tensor(tensor)
    chunk_bytes = 4 * 2**20
    whole = join_tensor_chunks(split_tensor(message, chunk_bytes))  # lazily: one chunk alive at a time
    del message
    decoded = deserialize_tensor(whole)
    del whole
    assert torch.equal(decoded.view(torch.int32), tensor.view(torch.int32))
    assert sum(1 for _ in split_tensor(serialize_tensor(tensor[: numel // 64]), chunk_bytes)) == 1
