"""Forward/Backward messages as wire bytes: `ExpertRequest` / `ExpertResponse` without copying large tensors.

What a unary call sends and receives. The bytes are ordinary ``dmoe.v1.ExpertRequest`` / ``ExpertResponse``
protobuf (see ``proto/dmoe/v1/expert.proto`` and ``tensor.proto``): any protobuf parser reads what
`encode_request` / `encode_response` write, and `decode_request` / `decode_response` read what any protobuf
serializer writes. Only large lossless messages are written and read without protobuf objects:

* **encode** (`encode_request`, `encode_response`): when the lossless tensors of a message hold at least
  `RAW_MIN_BYTES`, the small fields (uid, dtype, shape, ...) are written by hand in protobuf wire format, in
  field-number order, into one new, uninitialised ``bytes`` object, and each tensor's memory is copied into it once
  (one ``memmove`` below 1 MiB, else by torch with its threads; straight from a non-contiguous or CUDA tensor too):
  **one copy** of the payload, where `serialize_tensor` + ``SerializeToString`` make three (``tobytes``, the
  assignment to ``buffer`` and the serialization). Each tensor's ``buffer`` (field 4) is preceded by a padding
  field (number 15, length-delimited, zeros) that protobuf parsers skip as unknown, sized so that the payload
  starts 64-byte aligned within the message (in memory, a ``bytes`` object's data is only 16-byte aligned, which
  is enough for every dtype). Lossy tensors (float16 or 8-bit compression) are embedded as the
  ``dmoe.v1.Tensor`` that `serialize_tensor` makes.
* **decode** (`decode_request`, `decode_response`): a message of at least `RAW_MIN_BYTES` is walked field by
  field in Python and each whole lossless tensor becomes a `RawTensor`: dtype, shape and where its bytes lie in
  the message. `decode_tensor` checks it (exactly what `deserialize_tensor` checks, with the same messages) and
  returns a ``torch.frombuffer`` view of the received ``bytes`` object: **zero copies**, where ``FromString`` +
  `deserialize_tensor` make two. A payload that is not aligned for its dtype (from another encoder) is copied
  once, into memory of the payload's real length. A tensor with compression, scales, block size or chunks, or
  any field the walk does not expect (a wrong wire type for a known field, a group, an unknown dtype), is parsed
  by protobuf instead (that tensor alone, or the whole message), so both paths agree on every input.
* below `RAW_MIN_BYTES` both directions use protobuf objects (`serialize_tensor` + ``SerializeToString``,
  ``FromString`` + `deserialize_tensor`): for small messages upb's C code beats the Python work of the raw path,
  which has a fixed cost per message (the walk, creating the ``bytes`` object, a torch view per tensor).
  `RAW_MIN_BYTES` lies where the two cost the same (the figures are in ``bench/NOTES.md``).

**Ownership.** A decoded tensor is a view of the ``bytes`` object passed to the decoder: the caller hands that
object over (as gRPC's received message is: a fresh object nobody else uses). Under that rule the contract of
`proto.codec` holds: each decoded tensor is writable, tensors of one message never share memory (each covers its
own field's bytes), and the ``bytes`` object lives as long as any of them. Pass a ``bytearray`` or ``memoryview``
and the decoder works on a copy of it.

**Hostile bytes.** Every malformed message raises `TensorDecodeError` and nothing else. Nothing is allocated
from a size the message claims: a view allocates nothing, a copy is bounded by the bytes actually received, and
a shape is checked (dims, `MAX_NDIM`, element count, ``max_elements``) before its buffer is touched.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from proto.codec import (
    SUPPORTED_DTYPES,
    TensorDecodeError,
    check_sendable,
    check_shape,
    deserialize_tensor,
    serialize_tensor,
)
from proto.compression import frombuffer as _frombuffer
from proto.dmoe.v1 import expert_pb2, tensor_pb2
from proto.dmoe.v1.tensor_pb2 import COMPRESSION_FLOAT16, COMPRESSION_NONE

RAW_MIN_BYTES = 64 << 10
"""Messages (decode) and lossless payloads (encode) from this size on skip protobuf objects."""

ALIGN = 64
"""Alignment of every raw payload within the message, in bytes (a cache line; enough for every dtype)."""

_TORCH_DTYPES = {value: dtype for dtype, value in SUPPORTED_DTYPES.items()}
_PAD_TAG = (15 << 3) | 2  # field 15, length-delimited: padding, unknown to (and skipped by) protobuf
_SMALL_COPY_BYTES = 1 << 20  # contiguous payloads below this are copied with one memmove (no torch dispatch)
_UINT64 = (1 << 64) - 1

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


@dataclass(slots=True, eq=False)  # not frozen: a frozen dataclass's __init__ is slower, and one is made per tensor
class RawTensor:
    """A whole lossless tensor found in a received message, not checked yet: `decode_tensor` makes it a tensor.

    ``dtype`` (a ``dmoe.v1.DType`` value, always a supported one) and ``shape`` read like the fields of a
    ``dmoe.v1.Tensor`` message, so validation code handles both alike. The payload is
    ``raw[start:stop]``.
    """

    dtype: int
    shape: tuple[int, ...]
    raw: bytes
    start: int
    stop: int


Part = RawTensor | tensor_pb2.Tensor
"""One tensor of a decoded message: a `RawTensor` (fast path) or a ``dmoe.v1.Tensor`` message (protobuf)."""


@dataclass(slots=True)
class WireRequest:
    """A decoded `ExpertRequest`: its fields, with the tensors as undecoded `Part` s (see `tensors`)."""

    uid: str
    parts: list[Part]
    response_compression: int = COMPRESSION_NONE
    forward_id: int = 0

    def tensors(self, *, max_elements: int | None = None) -> list[torch.Tensor]:
        """Every tensor of the request, decoded (`decode_tensor`); raises `TensorDecodeError`."""
        return [decode_tensor(part, max_elements=max_elements) for part in self.parts]


# ---------------------------------------------------------------------------------------------------- encode


def encode_request(
    uid: str,
    tensors: list[torch.Tensor],
    *,
    response_compression: int = COMPRESSION_NONE,
    forward_id: int = 0,
    compression: int = COMPRESSION_NONE,
) -> bytes:
    """The wire bytes of an ``ExpertRequest`` for expert ``uid`` carrying ``tensors``, coded with ``compression``.

    Lossless payloads of `RAW_MIN_BYTES` and more are copied once into the result (see the module docstring).
    Raises what `serialize_tensor` raises (``TypeError``, ``ValueError``), and ``ValueError`` for a
    ``forward_id`` outside uint64 or a ``response_compression`` outside int32.
    """
    if not _raw_worthy(tensors, compression):  # protobuf checks the ranges of forward_id and response_compression
        return expert_pb2.ExpertRequest(
            uid=uid,
            tensors=[serialize_tensor(t, compression) for t in tensors],
            response_compression=response_compression,
            forward_id=forward_id,
        ).SerializeToString()
    if not 0 <= forward_id <= _UINT64:
        raise ValueError(f"forward_id must be in [0, 2**64 - 1], got {forward_id}")
    if not -(1 << 31) <= response_compression < (1 << 31):
        raise ValueError(f"response_compression must be an int32 enum value, got {response_compression}")
    head = b""
    if uid:
        raw_uid = uid.encode()
        head = b"\x0a" + _varint(len(raw_uid)) + raw_uid
    tail = b""
    if response_compression:
        tail += b"\x18" + _varint(response_compression)
    if forward_id:
        tail += b"\x20" + _varint(forward_id)
    return _assemble(head, 0x12, tensors, compression, tail)


def encode_response(tensors: list[torch.Tensor], *, compression: int = COMPRESSION_NONE) -> bytes:
    """The wire bytes of an ``ExpertResponse`` carrying ``tensors``; like `encode_request`."""
    if not _raw_worthy(tensors, compression):
        messages = [serialize_tensor(t, compression) for t in tensors]
        return expert_pb2.ExpertResponse(tensors=messages).SerializeToString()
    return _assemble(b"", 0x0A, tensors, compression, b"")


def is_lossless(tensor: torch.Tensor, compression: int) -> bool:
    """Whether `serialize_tensor` would send ``tensor`` as its own bytes under ``compression``."""
    if compression == COMPRESSION_NONE or not tensor.dtype.is_floating_point:
        return True
    return compression == COMPRESSION_FLOAT16 and tensor.dtype != torch.float32


def _raw_worthy(tensors: list[torch.Tensor], compression: int) -> bool:
    """Whether the lossless payloads reach `RAW_MIN_BYTES` (False for what protobuf's path should refuse)."""
    total = 0
    try:
        for tensor in tensors:
            if compression == COMPRESSION_NONE or is_lossless(tensor, compression):
                total += tensor.numel() * tensor.element_size()
    except (AttributeError, TypeError):  # not a tensor: `serialize_tensor` raises the TypeError
        return False
    return total >= RAW_MIN_BYTES


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (negative int32/int64 values as protobuf writes them: 10 bytes)."""
    if 0 <= value < _SMALL_VARINTS_UP_TO:
        return _SMALL_VARINTS[value]
    return _varint(value)


def _varint(value: int) -> bytes:
    value &= _UINT64  # negative int32/int64 values: 10 bytes of two's complement, as protobuf writes them
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS_UP_TO = 1 << 14
_SMALL_VARINTS = [_varint(value) for value in range(_SMALL_VARINTS_UP_TO)]  # dims, lengths and tags of small parts


def _assemble(head: bytes, tensor_tag: int, tensors: list[torch.Tensor], compression: int, tail: bytes) -> bytes:
    """One new ``bytes`` object: ``head``, each tensor as field ``tensor_tag``, then ``tail``.

    The object is created uninitialised and every byte of it is written before anyone else sees it.
    """
    parts: list[bytes | torch.Tensor] = []  # in order; bytes are copied as they are, tensors as raw payloads
    offset = 0

    def put(part: bytes | torch.Tensor, size: int) -> None:
        nonlocal offset
        parts.append(part)
        offset += size

    if head:
        put(head, len(head))
    tag = bytes([tensor_tag])
    for tensor in tensors:
        check_sendable(tensor, compression)
        if not is_lossless(tensor, compression):
            inner = serialize_tensor(tensor, compression).SerializeToString()
            put(tag + _varint(len(inner)) + inner, 1 + len(_varint(len(inner))) + len(inner))
            continue
        payload = tensor.detach()
        nbytes = payload.numel() * payload.element_size()
        fields = b"\x08" + _varint(SUPPORTED_DTYPES[payload.dtype])
        if payload.dim():
            dims = b"".join(_varint(dim) for dim in payload.shape)
            fields += b"\x12" + _varint(len(dims)) + dims
        if not nbytes:
            put(tag + _varint(len(fields)) + fields, 1 + len(_varint(len(fields))) + len(fields))
            continue
        buffer_head = b"\x22" + _varint(nbytes)
        pad = _padding(offset, len(fields), len(buffer_head), nbytes)
        inner = len(fields) + 2 + pad + len(buffer_head) + nbytes
        header = tag + _varint(inner) + fields + bytes((_PAD_TAG, pad)) + bytes(pad) + buffer_head
        put(header, len(header))
        put(payload, nbytes)
    if tail:
        put(tail, len(tail))
    return _fill(parts, offset)


def _padding(offset: int, fields: int, buffer_head: int, nbytes: int) -> int:
    """Zeros in the padding field (< `ALIGN`, so its length takes 1 byte) that align the payload's start.

    The tensor field starts at ``offset``: tag (1 byte), length varint, ``fields`` bytes, padding field
    (2 bytes + pad), ``buffer_head`` bytes, payload. The length varint's size depends on pad, so try each size.
    """
    for varint_size in range(1, 11):
        start = offset + 1 + varint_size + fields + 2 + buffer_head
        pad = -start % ALIGN
        if len(_varint(fields + 2 + pad + buffer_head + nbytes)) == varint_size:
            return pad
    raise AssertionError("no padding aligns the payload")  # pragma: no cover - some varint size always fits


def _fill(parts: list[bytes | torch.Tensor], total: int) -> bytes:
    raw = _new_bytes(None, total)
    out = _frombuffer(raw, torch.uint8)
    address = out.data_ptr()
    offset = 0
    for part in parts:
        if isinstance(part, bytes):
            ctypes.memmove(address + offset, part, len(part))
            offset += len(part)
            continue
        size = part.numel() * part.element_size()
        if size < _SMALL_COPY_BYTES and part.device.type == "cpu" and part.is_contiguous() and not part.is_neg():
            ctypes.memmove(address + offset, part.data_ptr(), size)
        else:  # torch copies (in parallel, from any strides or device) into the aligned slice
            out[offset : offset + size].view(part.dtype).view(part.shape).copy_(part)
        offset += size
    if offset != total:  # pragma: no cover - the sizes above are computed from the same parts
        raise AssertionError(f"wrote {offset} of {total} bytes")
    return raw


# ---------------------------------------------------------------------------------------------------- decode


class _Fallback(Exception):
    """The walk met something only protobuf should judge: parse the whole message with protobuf."""


def decode_request(raw: bytes) -> WireRequest:
    """Decode the wire bytes of an ``ExpertRequest`` (the caller hands ``raw`` over: see the module docstring).

    The tensors stay undecoded (`WireRequest.tensors`, `decode_tensor`), so that a caller can check their
    shapes first. Raises `TensorDecodeError` (only) for bytes that are not a valid ``ExpertRequest``.
    """
    try:
        raw = _owned(raw)
        if len(raw) >= RAW_MIN_BYTES:
            try:
                return _walk_request(raw)
            except _Fallback:
                pass
        message = expert_pb2.ExpertRequest.FromString(raw)
        return WireRequest(message.uid, list(message.tensors), message.response_compression, message.forward_id)
    except TensorDecodeError:
        raise
    except Exception as exc:  # DecodeError, and whatever else hostile bytes may make a parser raise
        raise _decode_error(exc) from exc


def decode_response(raw: bytes) -> list[torch.Tensor]:
    """The tensors of an ``ExpertResponse``'s wire bytes (handed over); raises `TensorDecodeError` (only)."""
    try:
        raw = _owned(raw)
        parts = None
        if len(raw) >= RAW_MIN_BYTES:
            try:
                parts = _walk_response(raw)
            except _Fallback:
                pass
        if parts is None:
            parts = expert_pb2.ExpertResponse.FromString(raw).tensors
        return [decode_tensor(part) for part in parts]
    except TensorDecodeError:
        raise
    except Exception as exc:
        raise _decode_error(exc) from exc


def decode_tensor(part: Part, *, max_elements: int | None = None) -> torch.Tensor:
    """A tensor of a decoded message: checked like `deserialize_tensor` checks, which decodes a protobuf part.

    A `RawTensor` becomes a writable view of the message's bytes (one copy if misaligned). Raises
    `TensorDecodeError` (only).
    """
    if type(part) is not RawTensor:
        return deserialize_tensor(part, max_elements=max_elements)
    try:
        return _raw_tensor(part, max_elements)
    except TensorDecodeError:
        raise
    except Exception as exc:
        raise _decode_error(exc) from exc


def _decode_error(exc: Exception) -> TensorDecodeError:
    return TensorDecodeError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _owned(raw) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)  # the caller may keep using its buffer: decode a copy that is ours
    raise TensorDecodeError(f"expected the message's bytes, got {type(raw).__name__}")


def parse_message(message_cls, raw: bytes):
    """``message_cls.FromString(raw)``, raising `TensorDecodeError` (only) for bytes that are not such a message."""
    try:
        return message_cls.FromString(raw)
    except Exception as exc:
        raise _decode_error(exc) from exc


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``; it must end before ``end``. 64 bits, as protobuf reads."""
    result = shift = 0
    while True:
        if pos >= end:
            raise TensorDecodeError("truncated message: a varint runs past its end")
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _UINT64, pos
        shift += 7
        if shift >= 70:
            raise TensorDecodeError("malformed message: a varint longer than 10 bytes")


def _length(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """(start, stop) of the length-delimited value at ``pos``."""
    length, pos = _read_varint(raw, pos, end)
    if length > end - pos:
        raise TensorDecodeError(f"truncated message: a field of {length} bytes runs past its end")
    return pos, pos + length


def _skip(raw: bytes, pos: int, end: int, wire: int) -> int:
    """Position after an unknown field's value; groups and invalid wire types go to protobuf."""
    if wire == 0:
        return _read_varint(raw, pos, end)[1]
    if wire == 2:
        return _length(raw, pos, end)[1]
    size = 8 if wire == 1 else 4 if wire == 5 else None
    if size is None:
        raise _Fallback
    if size > end - pos:
        raise TensorDecodeError("truncated message: a fixed-size field runs past its end")
    return pos + size


def _int32(value: int) -> int:
    """A 64-bit varint read as protobuf reads an int32 or enum field (the low 32 bits, signed)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _walk_request(raw: bytes) -> WireRequest:
    uid, parts, compression, forward_id = "", [], 0, 0
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = _read_varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        if number == 2 and wire == 2:
            start, pos = _length(raw, pos, end)
            parts.append(_walk_tensor(raw, start, pos))
        elif number == 1 and wire == 2:
            start, pos = _length(raw, pos, end)
            try:
                uid = raw[start:pos].decode()
            except UnicodeDecodeError:
                raise TensorDecodeError("uid is not valid UTF-8") from None
        elif number == 3 and wire == 0:
            value, pos = _read_varint(raw, pos, end)
            compression = _int32(value)
        elif number == 4 and wire == 0:
            forward_id, pos = _read_varint(raw, pos, end)
        elif 1 <= number <= 4 or number == 0:
            raise _Fallback
        else:
            pos = _skip(raw, pos, end, wire)
    return WireRequest(uid, parts, compression, forward_id)


def _walk_response(raw: bytes) -> list[Part]:
    parts = []
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = _read_varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        if number == 1 and wire == 2:
            start, pos = _length(raw, pos, end)
            parts.append(_walk_tensor(raw, start, pos))
        elif number <= 1:
            raise _Fallback
        else:
            pos = _skip(raw, pos, end, wire)
    return parts


def _walk_tensor(raw: bytes, pos: int, end: int) -> Part:
    """The `RawTensor` in ``raw[pos:end]``, or, for anything but a whole lossless tensor, protobuf's message."""
    first = pos
    try:
        dtype, shape, payload, other = 0, [], (pos, pos), 0
        while pos < end:
            key, pos = _read_varint(raw, pos, end)
            number, wire = key >> 3, key & 7
            if number == 4 and wire == 2:  # buffer (the last one wins, as in protobuf)
                payload = _length(raw, pos, end)
                pos = payload[1]
            elif number == 1 and wire == 0:  # dtype
                value, pos = _read_varint(raw, pos, end)
                dtype = _int32(value)
            elif number == 2 and wire == 2:  # shape, packed (several occurrences concatenate)
                dim_pos, pos = _length(raw, pos, end)
                while dim_pos < pos:
                    dim, dim_pos = _read_varint(raw, dim_pos, pos)
                    shape.append(dim - (1 << 64) if dim >> 63 else dim)
            elif number in (3, 6, 7) and wire == 0:  # compression, block_size, chunks: if not 0, protobuf's job
                value, pos = _read_varint(raw, pos, end)
                other = other or _int32(value)
            elif number == 5 and wire == 2:  # scales: likewise
                scales, pos = _length(raw, pos, end)
                other = other or pos - scales
            elif number <= 7:
                raise _Fallback
            else:
                pos = _skip(raw, pos, end, wire)
        if other or dtype not in _TORCH_DTYPES:
            raise _Fallback
    except _Fallback:  # this tensor alone goes through protobuf (a repeated message field merges nothing)
        return parse_message(tensor_pb2.Tensor, raw[first:end])
    return RawTensor(dtype, tuple(shape), raw, *payload)


def _raw_tensor(part: RawTensor, max_elements: int | None) -> torch.Tensor:
    dtype = _TORCH_DTYPES[part.dtype]
    shape = part.shape
    numel = check_shape(shape, max_elements)
    needed = numel * dtype.itemsize
    size = part.stop - part.start
    if size != needed:
        name = str(dtype).removeprefix("torch.")
        raise TensorDecodeError(f"buffer has {size} bytes but shape {list(shape)} of {name} needs {needed}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    data = memoryview(part.raw)[part.start : part.stop]
    tensor = _frombuffer(data, dtype)
    if tensor.data_ptr() % dtype.itemsize:  # misaligned (another encoder): one copy, of the real length
        tensor = torch.frombuffer(bytearray(data), dtype=dtype)
    if dtype == torch.bool and int(tensor.view(torch.uint8).max()) > 1:
        raise TensorDecodeError("bool buffer holds bytes other than 0 and 1")
    return tensor.view(shape)
