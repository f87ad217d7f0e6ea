"""Lossy coders for floating-point tensors: IEEE float16 and blockwise 8-bit.

Both coders run on the tensor's own device (a CUDA tensor is compressed on the GPU, so only the
compressed bytes cross to the host) and return little-endian ``bytes``. Decoders take the bytes
of a message that `proto.codec` has already validated and return a new CPU tensor.

Error bounds (x the original value, x' the decoded one, both float32):

- float16: for ``2**-14 <= |x| <= 65504``, ``|x - x'| <= |x| * 2**-11`` (round to nearest);
  below ``2**-14`` (fp16 subnormals) ``|x - x'| <= 2**-25``; ``|x| > 65504`` saturates to
  ``±65504`` instead of becoming infinite.
- blockwise 8-bit: ``|x - x'| <= absmax / 254`` (plus a few float32 ulps of ``absmax``), where
  ``absmax`` is the largest ``|value|`` of the block of ``block_size`` values that holds x.

A float16 or bfloat16 tensor decodes back to its own dtype, which adds that dtype's rounding
(half an ulp of x') on top of the bounds above.

NaN and ±Inf cannot be represented by either coder: encoding a tensor that holds one raises
``ValueError`` (send it with ``COMPRESSION_NONE`` to keep such values bit-exact).
"""

from __future__ import annotations

import math
import warnings

import torch

FLOAT16_MAX = 65504.0
"""Largest finite float16; larger magnitudes saturate to it under float16 compression."""

DEFAULT_BLOCK_SIZE = 64
"""Values per block (one float32 scale each) for blockwise 8-bit compression."""

_INT8_LEVELS = 127


def frombuffer(buffer: bytes, dtype: torch.dtype) -> torch.Tensor:
    """``torch.frombuffer`` over a non-empty, read-only ``bytes`` object, without a copy or a warning.

    torch warns once per process that such a buffer is not writable; that one warning is consumed
    at import (below), so no per-call ``warnings.catch_warnings`` is needed (it races between
    threads). Only under ``torch.set_warn_always(True)`` is it silenced per call. The caller decides
    whether the result may be written to.
    """
    if torch.is_warn_always_enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(buffer, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype)


def _consume_frombuffer_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0\0", dtype=torch.uint8)


_consume_frombuffer_warning()


def _check_finite(lo: torch.Tensor, hi: torch.Tensor, coder: str) -> None:
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(
            f"cannot encode NaN or Inf with {coder} compression; send the tensor with "
            "COMPRESSION_NONE to keep non-finite values exact"
        )


def encode_float16(tensor: torch.Tensor) -> bytes:
    """Encode a floating tensor as IEEE float16 bytes in row-major order.

    Magnitudes beyond 65504 saturate to ``±65504``. Raises ``ValueError`` if the tensor holds NaN
    or Inf.
    """
    if tensor.numel() > 0:
        lo, hi = torch.aminmax(tensor)  # propagates NaN; one pass, no large temporary
        _check_finite(lo, hi, "float16")
    # The input is finite, so every inf after the cast is an overflow: clamp it (on 2-byte data).
    half = tensor.to(torch.float16).clamp_(-FLOAT16_MAX, FLOAT16_MAX)
    return half.cpu().numpy().tobytes()


def decode_float16(buffer: bytes, dtype: torch.dtype) -> torch.Tensor:
    """Decode float16 bytes (``len(buffer)`` even and non-zero) into a flat tensor of ``dtype``."""
    return frombuffer(buffer, torch.float16).to(dtype)


def encode_blockwise_8bit(tensor: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[bytes, bytes]:
    """Encode a floating tensor as int8 codes with one float32 absmax scale per block.

    The tensor is flattened in row-major order and cut into blocks of ``block_size`` values (the
    last block may be shorter). Each block stores ``absmax = max |x|`` as a float32 scale and
    each value as ``round(x / absmax * 127)`` in one signed byte. Returns ``(codes, scales)``:
    ``numel`` bytes of codes and ``4 * ceil(numel / block_size)`` bytes of scales.
    Raises ``ValueError`` if the tensor holds NaN or Inf.
    """
    flat = tensor.reshape(-1).to(torch.float32)
    numel = flat.numel()
    if numel == 0:
        return b"", b""
    n_blocks = -(-numel // block_size)
    if numel % block_size:
        padded = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=flat.device)
        padded[:numel] = flat
        flat = padded
    blocks = flat.view(n_blocks, block_size)
    lo, hi = torch.aminmax(blocks, dim=1)  # NaN propagates into the block's scale
    absmax = torch.maximum(hi, -lo)
    _check_finite(absmax.min(), absmax.max(), "blockwise 8-bit")
    # x / absmax is in [-1, 1] exactly (no overflow even for subnormal absmax), so codes fit int8.
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = (blocks / divisor[:, None]).mul_(_INT8_LEVELS).round_().to(torch.int8)
    return codes.view(-1)[:numel].cpu().numpy().tobytes(), absmax.cpu().numpy().tobytes()


def decode_blockwise_8bit(codes: bytes, scale: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode int8 codes and float32 block scales into a flat tensor of ``dtype``.

    Expects validated input: ``len(codes) > 0`` and ``scale`` a float32 tensor of
    ``ceil(len(codes) / block_size)`` finite, non-negative values.
    """
    numel = len(codes)
    n_blocks = scale.numel()
    out = torch.empty(n_blocks * block_size, dtype=torch.float32)
    out[:numel] = frombuffer(codes, torch.int8)
    out[numel:] = 0
    # (code / 127) * absmax: |code / 127| <= 1, so this cannot overflow even for absmax near the float32
    # maximum (code * absmax would), and each step rounds once, also for subnormal absmax.
    out.view(n_blocks, block_size).div_(_INT8_LEVELS).mul_(scale[:, None])
    return out[:numel].to(dtype)
