"""The tensor codec: ``torch.Tensor`` <-> ``dmoe.v1.Tensor`` message, with chunking for large tensors.

Wire format (see ``proto/dmoe/v1/tensor.proto``, the contract): the tensor's elements in row-major
order as little-endian raw bytes, plus dtype and shape. bfloat16 travels as its own 2 bytes. Never
pickle. Lossless encoding is bit-exact (NaN payloads, -0.0 and Inf included). Lossy compression
(`proto.compression`) applies to floating dtypes only and is skipped silently for the others.

Copies, under protobuf's upb backend, where a ``bytes`` field is copied on every assignment *and* on
every read (each ``message.buffer`` returns a fresh ``bytes`` object):

- `serialize_tensor` makes one copy of the tensor into ``bytes`` (numpy ``tobytes``, which also
  makes non-contiguous tensors row-major in the same pass) and protobuf makes one more into the
  message; protobuf offers no way to hand it memory without a copy.
- `deserialize_tensor` reads the buffer once (protobuf's copy) and wraps that ``bytes`` object with
  ``torch.frombuffer``, without another copy. The ``bytes`` object is referenced by nobody but the
  returned tensor, so the tensor is safe to modify in place. When the bytes object is shared (with
  the pure-Python protobuf, which returns the stored object) the decoder copies it instead, so that
  guarantee always holds: **a decoded tensor owns its memory and is writable.**
- Read ``message.buffer`` as few times as possible: under upb each read is a full copy. For the
  same reason `encoded_size` costs one copy of the buffer (but no serialization).

With ``SerializeToString`` and ``FromString`` around them, a message costs five copies of the payload.
Unary Forward/Backward calls therefore go through `proto.wire`, which writes and reads the same wire
format without protobuf objects for large lossless tensors: one copy to encode, none to decode (the
decoded tensor is then a writable view of the received ``bytes`` object, which the caller hands over).
This module remains the codec of small, lossy and chunked tensors.

``torch.frombuffer`` warns once per process about non-writable buffers; `proto.compression`
triggers and swallows that one warning at import, so decoding is warning-free and thread-safe (no
per-call ``warnings.catch_warnings``, which races between threads). The warning therefore stays
silent for the rest of the process.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from proto import compression as _compression
from proto.dmoe.v1 import tensor_pb2
from proto.dmoe.v1.tensor_pb2 import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    DTYPE_BFLOAT16,
    DTYPE_BOOL,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT64,
)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
    raise ImportError("the dmoe tensor codec sends raw little-endian bytes and needs a little-endian host")


SUPPORTED_DTYPES: dict[torch.dtype, int] = {
    torch.float32: DTYPE_FLOAT32,
    torch.float16: DTYPE_FLOAT16,
    torch.bfloat16: DTYPE_BFLOAT16,
    torch.int64: DTYPE_INT64,
    torch.bool: DTYPE_BOOL,
}
"""Torch dtypes the codec can send, mapped to their ``dmoe.v1.DType`` enum value."""

MAX_NDIM = 64
"""Most dimensions a decoded tensor may have (a bound on hostile shapes, far above any real use)."""

_TORCH_DTYPES: dict[int, torch.dtype] = {value: dtype for dtype, value in SUPPORTED_DTYPES.items()}
# Same-size dtypes numpy understands: how each torch dtype is viewed to reach its raw bytes.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.float32,
    torch.float16: torch.float16,
    torch.bfloat16: torch.int16,
    torch.int64: torch.int64,
    torch.bool: torch.bool,
}
_COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_FLOAT16, COMPRESSION_BLOCKWISE_8BIT)
_MAX_INT64 = 2**63 - 1
_MAX_UINT32 = 2**32 - 1
# Bytes per element on the wire, and how an error message names that encoding.
_WIRE_ITEMSIZE = {COMPRESSION_FLOAT16: 2, COMPRESSION_BLOCKWISE_8BIT: 1}
_WIRE_NAME = {
    COMPRESSION_NONE: "",
    COMPRESSION_FLOAT16: " as float16",
    COMPRESSION_BLOCKWISE_8BIT: " as int8",
}


class TensorDecodeError(ValueError):
    """A ``dmoe.v1.Tensor`` message (or a stream of chunks) that cannot be decoded.

    The message says what is wrong, in words fit for a gRPC INVALID_ARGUMENT status, e.g.
    ``"buffer has 12 bytes but shape [2, 3] of float32 needs 24"``.
    """


@dataclass(frozen=True)
class TensorDescriptor:
    """Shape, dtype and wire compression of a tensor, without its values.

    The plain counterpart of hivemind's ``BatchTensorDescriptor``: build it from a tensor with
    `from_tensor`, turn it back into a (zero) tensor with `make_zeros`. ``shape`` is normalised to a
    tuple of ints; dims must be non-negative, ``dtype`` one of `SUPPORTED_DTYPES` and
    ``compression`` a ``dmoe.v1.Compression`` value (``ValueError`` otherwise).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    compression: int = COMPRESSION_NONE

    def __post_init__(self) -> None:
        shape = tuple(int(dim) for dim in self.shape)
        if any(dim < 0 for dim in shape):
            raise ValueError(f"shape {list(shape)} has a negative dimension")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype}; supported: {_dtype_names()}")
        if self.compression not in _COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression}")
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, compression: int = COMPRESSION_NONE) -> TensorDescriptor:
        """Describe ``tensor`` (its shape and dtype) with the given wire compression."""
        return cls(tuple(tensor.shape), tensor.dtype, compression)

    def make_zeros(self) -> torch.Tensor:
        """A CPU tensor of zeros with this shape and dtype."""
        return torch.zeros(self.shape, dtype=self.dtype)


def serialize_tensor(
    tensor: torch.Tensor,
    compression: int = COMPRESSION_NONE,
    *,
    block_size: int = _compression.DEFAULT_BLOCK_SIZE,
) -> tensor_pb2.Tensor:
    """Encode ``tensor`` into a whole ``dmoe.v1.Tensor`` message (``chunks`` 0).

    ``COMPRESSION_NONE`` is bit-exact. ``COMPRESSION_FLOAT16`` applies to float32 only (float16 and
    bfloat16 already take 2 bytes); ``COMPRESSION_BLOCKWISE_8BIT`` to every floating dtype, with
    ``block_size`` values per scale. For other dtypes lossy compression falls back to
    ``COMPRESSION_NONE`` silently; the message's ``compression`` says what was used. Error bounds are
    in `proto.compression`. Tensors on another device are moved to the CPU (lossy coding runs on the
    device first). Non-contiguous and zero-element tensors and 0-d scalars are fine.

    Raises ``ValueError`` for an unsupported dtype, layout or compression, a ``block_size`` outside
    ``[1, 2**32 - 1]``, or NaN/Inf under lossy compression; ``TypeError`` if ``tensor`` is not a tensor.
    """
    check_sendable(tensor, compression)
    tensor = tensor.detach()
    message = tensor_pb2.Tensor(dtype=SUPPORTED_DTYPES[tensor.dtype], shape=tensor.shape)
    if compression == COMPRESSION_FLOAT16 and tensor.dtype == torch.float32:
        message.compression = COMPRESSION_FLOAT16
        message.buffer = _compression.encode_float16(tensor)
    elif compression == COMPRESSION_BLOCKWISE_8BIT and tensor.dtype.is_floating_point:
        if not 1 <= block_size <= _MAX_UINT32:
            raise ValueError(f"block_size must be in [1, 2**32 - 1], got {block_size}")
        codes, scales = _compression.encode_blockwise_8bit(tensor, block_size)
        message.compression = COMPRESSION_BLOCKWISE_8BIT
        message.block_size = block_size
        message.buffer = codes
        message.scales = scales
    else:
        message.buffer = raw_bytes(tensor)
    return message


def deserialize_tensor(message: tensor_pb2.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decode a whole ``dmoe.v1.Tensor`` message into a new, writable CPU tensor.

    Everything is checked before anything large is allocated: dtype and compression enum values,
    shape (non-negative dims, at most `MAX_NDIM` of them, element count within int64 and within
    ``max_elements`` when given), buffer (and, for 8-bit, scales) lengths against the shape, that
    ``block_size``/``scales`` appear only with 8-bit compression, 8-bit scales finite and
    non-negative, bool bytes 0 or 1, and that the message is not one chunk of several (join those
    with `join_tensor_chunks` first). Every problem raises `TensorDecodeError`; nothing else is raised.

    The result owns its memory (see the module docstring: zero-copy over protobuf's own copy).
    """
    try:
        return _deserialize(message, max_elements)
    except TensorDecodeError:
        raise
    except Exception as exc:  # a bug or a hostile corner we did not foresee: still a clean error
        raise TensorDecodeError(f"cannot decode tensor: {type(exc).__name__}: {exc}") from exc


def split_tensor(message: tensor_pb2.Tensor, chunk_bytes: int) -> Iterator[tensor_pb2.Tensor]:
    """Cut a whole message into chunks whose ``buffer`` + ``scales`` each take at most ``chunk_bytes``.

    A message that fits is yielded itself, unchanged (``chunks`` 0). Otherwise the first chunk
    carries all metadata, the whole ``scales`` and ``chunks = n``; the ``n - 1`` later chunks carry
    only the next slice of ``buffer``. The first chunk's buffer slice is shortened by the size of
    ``scales`` so that it too stays within ``chunk_bytes`` (when ``scales`` alone exceed
    ``chunk_bytes``, the first chunk carries the scales and no buffer). Every buffer slice is at
    most ``chunk_bytes``. Leave headroom under gRPC's message limit for the few bytes of framing and
    metadata. Raises ``ValueError`` if ``chunk_bytes < 1`` or the message is already a chunk.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if message.chunks > 1:
        raise ValueError(f"message is already the first of {message.chunks} chunks")
    return _split(message, chunk_bytes)


def _split(message: tensor_pb2.Tensor, chunk_bytes: int) -> Iterator[tensor_pb2.Tensor]:
    buffer = message.buffer  # under upb: one copy, made once
    scales = message.scales
    if len(buffer) + len(scales) <= chunk_bytes:
        yield message
        return
    first_len = max(chunk_bytes - len(scales), 0)
    n_chunks = 1 + -(-(len(buffer) - first_len) // chunk_bytes)
    if n_chunks > _MAX_UINT32:
        raise ValueError(f"{len(buffer)} bytes in chunks of {chunk_bytes} need more than 2**32 - 1 chunks")
    view = memoryview(buffer)
    yield tensor_pb2.Tensor(
        dtype=message.dtype,
        shape=message.shape,
        compression=message.compression,
        buffer=bytes(view[:first_len]),
        scales=scales,
        block_size=message.block_size,
        chunks=n_chunks,
    )
    for start in range(first_len, len(buffer), chunk_bytes):
        yield tensor_pb2.Tensor(buffer=bytes(view[start : start + chunk_bytes]))


def join_tensor_chunks(chunks: Iterable[tensor_pb2.Tensor], *, max_bytes: int | None = None) -> tensor_pb2.Tensor:
    """Rebuild one whole message from the chunks `split_tensor` made, in order.

    A single whole message (``chunks`` 0 or 1) is returned as is. Raises `TensorDecodeError` when
    there are fewer or more chunks than the first one announces, when a later chunk carries
    metadata, or when the buffer grows beyond ``max_bytes`` (if given; checked as chunks arrive, so
    a hostile stream cannot make the joiner hold more than that).
    """
    iterator = iter(chunks)
    first = next(iterator, None)
    if first is None:
        raise TensorDecodeError("no chunks to join")
    whole = _join(first, iterator, max_bytes)
    if next(iterator, None) is not None:
        raise TensorDecodeError(f"more chunks than the {max(first.chunks, 1)} the first chunk announces")
    return whole


def iter_tensors_from_chunks(
    chunks: Iterable[tensor_pb2.Tensor], *, max_bytes: int | None = None
) -> Iterator[tensor_pb2.Tensor]:
    """Turn a stream of several chunked tensors back into whole messages, lazily and in order.

    Each tensor starts with a message whose ``chunks`` count (0 or 1: whole) says how many messages
    it spans. Raises `TensorDecodeError` if the stream ends inside a tensor, a later chunk carries
    metadata, or one tensor's buffer exceeds ``max_bytes`` (if given).
    """
    iterator = iter(chunks)
    for first in iterator:
        yield _join(first, iterator, max_bytes)


def encoded_size(message: tensor_pb2.Tensor) -> int:
    """Bytes of payload (``buffer`` + ``scales``) a message carries, without serializing it.

    Under upb reading a ``bytes`` field copies it, so this costs one memcpy of the payload.
    """
    return len(message.buffer) + len(message.scales)


# ---------------------------------------------------------------------------------------------
# internals


def _dtype_names() -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in SUPPORTED_DTYPES)


def check_sendable(tensor: torch.Tensor, compression: int = COMPRESSION_NONE) -> None:
    """Raise what `serialize_tensor` raises for a tensor or compression it cannot send (shared with `proto.wire`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {tensor.dtype}; supported: {_dtype_names()}")
    if tensor.layout != torch.strided:
        raise ValueError(f"only dense (strided) tensors can be sent, got layout {tensor.layout}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"unknown compression {compression}")


def check_shape(shape: tuple[int, ...], max_elements: int | None) -> int:
    """The element count of a decoded ``shape``, or `TensorDecodeError` (shared with `proto.wire`).

    At most `MAX_NDIM` dims, none negative, a count within int64 and within ``max_elements`` when given.
    """
    if len(shape) > MAX_NDIM:
        raise TensorDecodeError(f"shape has {len(shape)} dimensions, more than {MAX_NDIM}")
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"shape {list(shape)} has a negative dimension")
    numel = math.prod(shape)
    if numel > _MAX_INT64:
        raise TensorDecodeError(f"shape {list(shape)} has {numel} elements, more than int64 can count")
    if max_elements is not None and numel > max_elements:
        raise TensorDecodeError(f"shape {list(shape)} has {numel} elements, more than the limit of {max_elements}")
    return numel


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in row-major order as bytes: one copy (also for non-contiguous)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_neg() and tensor.numel():
        return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    tensor = tensor.cpu().resolve_neg()
    return tensor.view(_NUMPY_VIEW[tensor.dtype]).numpy().tobytes()


def _describe(shape: Iterable[int], dtype: torch.dtype) -> str:
    return f"shape {list(shape)} of {str(dtype).removeprefix('torch.')}"


def _deserialize(message: tensor_pb2.Tensor, max_elements: int | None) -> torch.Tensor:
    if not isinstance(message, tensor_pb2.Tensor):
        raise TensorDecodeError(f"expected a dmoe.v1.Tensor message, got {type(message).__name__}")
    if message.chunks > 1:
        raise TensorDecodeError(f"message is the first of {message.chunks} chunks; join the chunks before decoding")
    if message.dtype not in _TORCH_DTYPES:
        name = "DTYPE_UNSPECIFIED" if message.dtype == 0 else f"unknown dtype {message.dtype}"
        raise TensorDecodeError(f"{name}: expected one of float32, float16, bfloat16, int64, bool")
    dtype = _TORCH_DTYPES[message.dtype]
    compression = message.compression
    if compression not in _COMPRESSIONS:
        raise TensorDecodeError(f"unknown compression {compression}")
    if compression != COMPRESSION_NONE and not dtype.is_floating_point:
        raise TensorDecodeError(f"lossy compression {compression} does not apply to {dtype}")

    shape = tuple(message.shape)
    numel = check_shape(shape, max_elements)

    if compression == COMPRESSION_BLOCKWISE_8BIT:
        if message.block_size == 0:
            raise TensorDecodeError("block_size is 0; BLOCKWISE_8BIT needs at least 1 value per block")
    elif message.block_size != 0:
        raise TensorDecodeError(f"block_size is set ({message.block_size}) but only BLOCKWISE_8BIT uses it")
    scales = message.scales
    if compression != COMPRESSION_BLOCKWISE_8BIT and scales:
        raise TensorDecodeError(f"scales are set ({len(scales)} bytes) but only BLOCKWISE_8BIT uses them")

    buffer = message.buffer  # under upb: a fresh copy nobody else references
    # Zero-copy is safe only when the bytes object is ours alone (local name + getrefcount's argument).
    owned = sys.getrefcount(buffer) <= 2
    needed = numel * _WIRE_ITEMSIZE.get(compression, dtype.itemsize)
    if len(buffer) != needed:
        raise TensorDecodeError(
            f"buffer has {len(buffer)} bytes but {_describe(shape, dtype)}{_WIRE_NAME[compression]} needs {needed}"
        )
    if compression == COMPRESSION_BLOCKWISE_8BIT:
        n_blocks = -(-numel // message.block_size)
        if len(scales) != 4 * n_blocks:
            raise TensorDecodeError(
                f"scales have {len(scales)} bytes but {numel} values in blocks of {message.block_size} "
                f"need {n_blocks} float32 scales ({4 * n_blocks} bytes)"
            )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)

    if compression == COMPRESSION_FLOAT16 and dtype != torch.float16:
        return _compression.decode_float16(buffer, dtype).view(shape)
    if compression == COMPRESSION_BLOCKWISE_8BIT:
        scale = _compression.frombuffer(scales, torch.float32)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise TensorDecodeError("8-bit scales must be finite and non-negative")
        return _compression.decode_blockwise_8bit(buffer, scale, message.block_size, dtype).view(shape)
    # lossless (or float16 "compression" of a float16 tensor, which is the same bytes)
    if owned:
        tensor = _compression.frombuffer(buffer, dtype)
    else:
        tensor = torch.frombuffer(bytearray(buffer), dtype=dtype)
    if dtype == torch.bool and int(tensor.view(torch.uint8).max()) > 1:
        raise TensorDecodeError("bool buffer holds bytes other than 0 and 1")
    return tensor.view(shape)


def _join(first: tensor_pb2.Tensor, rest: Iterator[tensor_pb2.Tensor], max_bytes: int | None) -> tensor_pb2.Tensor:
    """Join ``first`` and the ``first.chunks - 1`` next messages of ``rest`` into one message."""
    if not isinstance(first, tensor_pb2.Tensor):
        raise TensorDecodeError(f"expected a dmoe.v1.Tensor message, got {type(first).__name__}")
    n_chunks = first.chunks
    if n_chunks <= 1:
        if max_bytes is not None and encoded_size(first) > max_bytes:
            raise TensorDecodeError(f"tensor payload exceeds the limit of {max_bytes} bytes")
        return first
    parts = [first.buffer]
    total = len(parts[0])
    for index in range(2, n_chunks + 1):
        chunk = next(rest, None)
        if chunk is None:
            raise TensorDecodeError(f"stream ended after {index - 1} of {n_chunks} chunks")
        if not isinstance(chunk, tensor_pb2.Tensor):
            raise TensorDecodeError(f"expected a dmoe.v1.Tensor message, got {type(chunk).__name__}")
        if any((chunk.dtype, chunk.shape, chunk.compression, chunk.block_size, chunk.chunks, chunk.scales)):
            raise TensorDecodeError(f"chunk {index} of {n_chunks} carries metadata that only the first chunk may carry")
        part = chunk.buffer
        total += len(part)
        if max_bytes is not None and total > max_bytes:
            raise TensorDecodeError(f"chunked tensor exceeds the limit of {max_bytes} bytes")
        parts.append(part)
    buffer = b"".join(parts)
    del parts
    return tensor_pb2.Tensor(
        dtype=first.dtype,
        shape=first.shape,
        compression=first.compression,
        buffer=buffer,
        scales=first.scales,
        block_size=first.block_size,
    )
