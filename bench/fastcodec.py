"""Prototype: `dmoe.v1` requests and responses written and read as raw bytes around the protobuf header.

A proposal for `proto/` (see BENCHMARKS.md, "codec"), measured by `bench.codec`. The messages stay valid
`dmoe.v1.ExpertRequest` / `ExpertResponse` protobuf, readable by `FromString` (tested), but the tensor bytes
never pass through a protobuf object:

* encode: the small fields (uid, dtype, shape, ...) are written by hand in protobuf wire format, and the
  tensor's memory is copied once into a new, uninitialised `bytes` object (by torch, so with all its threads,
  and straight from a non-contiguous tensor too) - **one copy** of the payload, where `serialize_tensor` +
  `SerializeToString` make three (numpy `tobytes`, the `buffer` assignment, the serialization);
* each tensor's `buffer` is preceded by a padding field (number 15, skipped as unknown by protobuf
  parsers) so that the payload starts 64-byte aligned within the message;
* decode: one pass over the wire format finds each `buffer`, and the tensor is a `torch.frombuffer` view of the
  received `bytes` object - **zero copies**, where `FromString` + `deserialize_tensor` make two. The view is
  used when the payload is aligned for its dtype (always, from this encoder) and the caller hands the `bytes`
  over (as gRPC's received message is: nobody else uses it, the rule `proto.codec` already applies to
  protobuf's copy); otherwise it is copied once.

Lossless only (``COMPRESSION_NONE``); messages with compression, scales or chunks go through the protobuf path.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from proto import SUPPORTED_DTYPES, TensorDecodeError
from proto.compression import frombuffer as _frombuffer

_TORCH = {value: dtype for dtype, value in SUPPORTED_DTYPES.items()}
_VIEW = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: reach its bytes through int16
_ALIGN = 64
_PAD_TAG = b"\x7a"  # field 15, wire type 2 (length-delimited): padding, an unknown field to protobuf


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
PARALLEL_COPY_BYTES = 1 << 20  # from this size on, payloads are copied by torch (all its threads)


def _payload(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().resolve_neg().resolve_conj()


def _assemble(parts: list, total: int) -> bytes:
    """One new `bytes` object holding `parts` (bytes, or tensors copied in by torch: one parallel pass each).

    The object is created uninitialised and written through a tensor view before anyone else sees it.
    """
    if total < PARALLEL_COPY_BYTES:
        return b"".join(p if isinstance(p, bytes) else memoryview(_numpy(p)) for p in parts)
    raw = _new_bytes(None, total)
    out = _frombuffer(raw, torch.uint8)
    offset = 0
    for part in parts:
        if isinstance(part, bytes):
            out[offset : offset + len(part)].copy_(torch.frombuffer(bytearray(part), dtype=torch.uint8))
            offset += len(part)
        else:
            size = part.numel() * part.element_size()
            view = _VIEW.get(part.dtype, part.dtype)
            out[offset : offset + size].view(view).view(part.shape).copy_(part.view(view))
            offset += size
    return raw


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.contiguous().view(_VIEW.get(tensor.dtype, tensor.dtype)).numpy().reshape(-1)
    return array.view(np.uint8)


def encode(tensors: list[torch.Tensor], *, uid: str | None = None, response_compression: int = 0) -> bytes:
    """An `ExpertRequest` (when `uid` is given) or an `ExpertResponse` holding `tensors`, as wire bytes."""
    parts: list[bytes | torch.Tensor] = []
    offset = 0

    def put(part) -> None:
        nonlocal offset
        parts.append(part)
        offset += len(part) if isinstance(part, bytes) else part.numel() * part.element_size()

    if uid is not None:
        raw_uid = uid.encode()
        put(b"\x0a" + _varint(len(raw_uid)) + raw_uid)
    outer_tag = b"\x12" if uid is not None else b"\x0a"
    for tensor in tensors:
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {tensor.dtype}")
        payload = _payload(tensor)
        nbytes = payload.numel() * payload.element_size()
        head = bytearray(b"\x08" + _varint(SUPPORTED_DTYPES[tensor.dtype]))
        if tensor.dim():
            dims = b"".join(_varint(d) for d in tensor.shape)
            head += b"\x12" + _varint(len(dims)) + dims
        buffer_head = b"\x22" + _varint(nbytes) if nbytes else b""
        # the padding field goes between the header and the buffer; its size makes the payload start aligned
        inner_fixed = len(head) + len(buffer_head) + nbytes
        for pad in range(_ALIGN + 2):
            pad_field = _PAD_TAG + _varint(pad) + bytes(pad)
            inner = inner_fixed + len(pad_field)
            start = offset + len(outer_tag) + len(_varint(inner)) + len(head) + len(pad_field) + len(buffer_head)
            if start % _ALIGN == 0:
                break
        put(outer_tag + _varint(inner) + bytes(head) + pad_field + buffer_head)
        if nbytes:
            put(payload)
    if uid is not None and response_compression:
        put(b"\x18" + _varint(response_compression))
    return _assemble(parts, offset)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise TensorDecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TensorDecodeError("varint too long")


def _fields(data: memoryview, pos: int, end: int):
    """(field number, wire type, value or (start, stop) of a length-delimited field) of one message."""
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise TensorDecodeError("field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise TensorDecodeError(f"unsupported wire type {wire}")


def decode(raw: bytes, *, request: bool, copy: bool = False) -> tuple[str, list[torch.Tensor], int]:
    """(uid, tensors, response_compression) of an `ExpertRequest` (`request`) or an `ExpertResponse`.

    The tensors are views of `raw` (the caller hands it over: gRPC's received `bytes`, used for nothing else),
    each writable and disjoint from the others; with `copy`, each tensor gets its own memory instead.
    """
    data = memoryview(raw)
    base = np.frombuffer(raw, dtype=np.uint8).ctypes.data if len(raw) else 0
    uid, compression, tensors = "", 0, []
    tensor_field = 2 if request else 1
    for number, _wire, value in _fields(data, 0, len(data)):
        if request and number == 1:
            uid = bytes(data[value[0] : value[1]]).decode()
        elif request and number == 3:
            compression = value
        elif number == tensor_field:
            tensors.append(_tensor(raw, data, base, *value))
    if copy:
        tensors = [t.clone() for t in tensors]
    return uid, tensors, compression


def _tensor(raw: bytes, data: memoryview, base: int, start: int, stop: int) -> torch.Tensor:
    dtype, shape, payload = None, [], None
    for number, wire, value in _fields(data, start, stop):
        if number == 1:
            dtype = _TORCH.get(value)
        elif number == 2 and wire == 2:
            pos, end = value
            while pos < end:
                dim, pos = _read_varint(data, pos)
                shape.append(dim)
        elif number == 2:
            shape.append(value)
        elif number == 4:
            payload = value
        elif number in (3, 5, 6, 7) and value:
            raise TensorDecodeError("the raw-bytes prototype handles only whole, uncompressed tensors")
    if dtype is None:
        raise TensorDecodeError("missing or unknown dtype")
    numel = int(np.prod(shape)) if shape else 1
    size = numel * dtype.itemsize
    begin, end = payload if payload is not None else (start, start)
    if end - begin != size:
        raise TensorDecodeError(f"buffer has {end - begin} bytes but shape {shape} of {dtype} needs {size}")
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    if (base + begin) % dtype.itemsize == 0:
        flat = _frombuffer(data[begin:end], _VIEW.get(dtype, dtype))
    else:  # misaligned (an encoder without padding): one copy into aligned memory
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=_VIEW.get(dtype, dtype))
    return flat.view(dtype).view(shape)
