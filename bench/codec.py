"""codec: encode+decode GB/s of the tensor codec, 1 MiB … 256 MiB, fp32 and bf16, against an in-memory copy.

Paths, each a full round trip from a tensor back to a tensor, interleaved with the baseline `tensor.clone()`:

* ``message``: `serialize_tensor` + `deserialize_tensor` (tensor ⇄ `dmoe.v1.Tensor` object);
* ``wire``: the same plus `ExpertRequest.SerializeToString` / `FromString` (tensor ⇄ the bytes gRPC sends):
  what a call really pays, lossless, and with ``float16`` and ``8bit`` compression;
* ``raw-bytes (prototype)``: `bench.fastcodec`, the same wire bytes written and read around the protobuf
  header (one copy to encode, none to decode).

GB/s = tensor bytes / (encode + decode seconds); ``x copy`` = that speed / the speed of `clone()`.
"""

from __future__ import annotations

import math

import torch

from bench import fastcodec
from bench.common import Side, interleave, ratio, summarize
from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    deserialize_tensor,
    expert_pb2,
    serialize_tensor,
)

MIB = 1 << 20


def _message_round_trip(tensor: torch.Tensor, compression: int) -> torch.Tensor:
    return deserialize_tensor(serialize_tensor(tensor, compression))


def _wire_round_trip(tensor: torch.Tensor, compression: int) -> torch.Tensor:
    raw = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(tensor, compression)]).SerializeToString()
    return deserialize_tensor(expert_pb2.ExpertRequest.FromString(raw).tensors[0])


def _raw_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    raw = fastcodec.encode([tensor], uid="ffn.0")
    return fastcodec.decode(raw, request=True)[1][0]


PATHS = {
    "message": lambda t: _message_round_trip(t, COMPRESSION_NONE),
    "wire": lambda t: _wire_round_trip(t, COMPRESSION_NONE),
    "wire, float16": lambda t: _wire_round_trip(t, COMPRESSION_FLOAT16),
    "wire, 8bit": lambda t: _wire_round_trip(t, COMPRESSION_BLOCKWISE_8BIT),
    "raw-bytes (prototype)": _raw_round_trip,
}
LOSSLESS = ("message", "wire", "raw-bytes (prototype)")


def run(ctx) -> dict:
    torch.set_num_threads(ctx.threads)
    sizes = [1, 4] if ctx.quick else [1, 4, 16, 64, 256]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mib in sizes:
            tensor = torch.randn(mib * MIB // dtype.itemsize).to(dtype)
            # float16 compression applies to float32 only (bf16 is already 2 bytes)
            paths = {name: fn for name, fn in PATHS.items() if not (name == "wire, float16" and dtype != torch.float32)}
            for name in LOSSLESS:  # the lossless paths must give back the very same bits
                if not torch.equal(paths[name](tensor).view(torch.uint8), tensor.view(torch.uint8)):
                    raise AssertionError(f"{name} did not round-trip {dtype} exactly")
            reps = 3 if ctx.quick else (5 if mib >= 64 else 9)
            sides = [Side("copy", lambda t=tensor: t.clone(), reps=reps, warmup=1)]
            sides += [Side(name, lambda fn=fn, t=tensor: fn(t), reps=reps, warmup=1) for name, fn in paths.items()]
            interleave(sides)
            copy_s = summarize(sides[0].samples)["median"]
            for side in sides:
                stats = summarize(side.samples)
                gbps = mib * MIB / stats["median"] / 1e9 if side.samples else math.nan
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "mib": mib,
                        "path": side.name,
                        "median_s": stats["median"],
                        "gb_per_s": gbps,
                        "vs_copy": ratio(copy_s, stats["median"]),
                        "errors": side.errors[:2],
                    }
                )
            ctx.log(
                f"codec: {dtype} {mib} MiB: "
                + ", ".join(f"{r['path']} {r['gb_per_s']:.2f} GB/s" for r in rows[-len(sides) :])
            )
            del tensor
    return {"sizes_mib": sizes, "rows": rows, "targets": _targets(rows)}


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for path in ("wire", "message", "raw-bytes (prototype)"):
        picked = [r for r in rows if r["path"] == path and r["mib"] >= 16]
        if picked:
            worst = min(r["vs_copy"] or 0 for r in picked)
            out.append(
                {
                    "name": f"codec '{path}' lossless, >= 16 MiB, worst x copy",
                    "value": worst,
                    "target": ">= 0.5",
                    "met": worst >= 0.5,
                }
            )
    return out


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = ["dtype", "MiB", "path", "GB/s", "x copy", "median s"]
    rows = [[r["dtype"], r["mib"], r["path"], r["gb_per_s"], r["vs_copy"], r["median_s"]] for r in result["rows"]]
    return headers, rows
