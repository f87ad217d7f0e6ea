"""codec: encode+decode GB/s of the tensor codec, 1 MiB … 256 MiB, fp32 and bf16, against an in-memory copy.

Paths, each a full round trip from a tensor back to a tensor, interleaved with the baseline `tensor.clone()`:

* ``wire request`` and ``wire response``: what a Forward/Backward call does, `proto.wire` (tensor ⇄ the bytes
  gRPC sends): `encode_request` + `decode_request`, `encode_response` + `decode_response`; lossless, and the
  request with ``float16`` and ``8bit`` compression (``wire, float16``, ``wire, 8bit``);
* ``message``: `serialize_tensor` + `deserialize_tensor` (tensor ⇄ `dmoe.v1.Tensor` object);
* ``protobuf wire``: the same plus `ExpertRequest.SerializeToString` / `FromString`: what a call paid before
  `proto.wire` (and still pays for a message under its 64 KiB threshold).

GB/s = tensor bytes / (encode + decode seconds); ``x copy`` = that speed / the speed of `clone()`. Every side runs
in this process under the same allocator settings (`bench.common.tune_allocator`, applied by `dmoe bench`); the
copy and the two lossless ``wire`` paths are interleaved with each other, the other paths run after them (their
large transient allocations would otherwise make the next side page-fault). ``page faults/run``: minor faults
per encode+decode (or copy), warm-up included.
"""

from __future__ import annotations

import math
import resource

import torch

from bench.common import Side, interleave, ratio, summarize
from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    decode_request,
    decode_response,
    deserialize_tensor,
    encode_request,
    encode_response,
    expert_pb2,
    serialize_tensor,
)

MIB = 1 << 20


def _message_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    return deserialize_tensor(serialize_tensor(tensor))


def _protobuf_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    raw = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(tensor)]).SerializeToString()
    return deserialize_tensor(expert_pb2.ExpertRequest.FromString(raw).tensors[0])


def _request_round_trip(tensor: torch.Tensor, compression: int = COMPRESSION_NONE) -> torch.Tensor:
    raw = encode_request("ffn.0", [tensor], forward_id=1, compression=compression)
    return decode_request(raw).tensors()[0]


def _response_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    return decode_response(encode_response([tensor]))[0]


PATHS = {
    "wire request": _request_round_trip,
    "wire response": _response_round_trip,
    "wire, float16": lambda t: _request_round_trip(t, COMPRESSION_FLOAT16),
    "wire, 8bit": lambda t: _request_round_trip(t, COMPRESSION_BLOCKWISE_8BIT),
    "message": _message_round_trip,
    "protobuf wire": _protobuf_round_trip,
}
LOSSLESS = ("wire request", "wire response", "message", "protobuf wire")
PRODUCTION = ("wire request", "wire response")  # the lossless paths of a call: the target applies to these


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _counting(fn, faults: dict, name: str):
    """``fn`` that also adds the page faults it takes to ``faults[name]``."""

    def run():
        before = _faults()
        fn()
        faults[name] += _faults() - before

    return run


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
            paths = {"copy": lambda t: t.clone(), **paths}
            faults = dict.fromkeys(paths, 0)
            sides = {
                name: Side(name, _counting(lambda fn=fn, t=tensor: fn(t), faults, name), reps=reps, warmup=1)
                for name, fn in paths.items()
            }
            # The copy and the paths of a call run interleaved on their own: the protobuf paths free over a GiB at
            # 256 MiB, which makes glibc return memory to the OS (M_TRIM_THRESHOLD is 1 GiB in this process), and
            # whichever side runs next would pay the page faults of getting it back.
            interleave([sides[name] for name in ("copy", *PRODUCTION)])
            interleave([side for name, side in sides.items() if name not in ("copy", *PRODUCTION)])
            copy_s = summarize(sides["copy"].samples)["median"]
            for side in sides.values():
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
                        "page_faults_per_run": faults[side.name] / max(1, len(side.samples) + side.warmup),
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
    picked = [r for r in rows if r["path"] in PRODUCTION and r["mib"] >= 16]
    if not picked:
        return []
    worst = min(r["vs_copy"] or 0 for r in picked)
    return [
        {
            "name": "codec, >= 16 MiB, lossless (wire request and response): worst x copy",
            "value": worst,
            "target": ">= 0.5",
            "met": worst >= 0.5,
        }
    ]


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = ["dtype", "MiB", "path", "GB/s", "x copy", "median s", "page faults/run"]
    rows = [
        [r["dtype"], r["mib"], r["path"], r["gb_per_s"], r["vs_copy"], r["median_s"], r.get("page_faults_per_run")]
        for r in result["rows"]
    ]
    return headers, rows
