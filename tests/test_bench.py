"""`dmoe bench`: every benchmark runs in quick mode and writes the JSON fields the report reads; the raw-bytes
codec prototype writes messages that protobuf reads back. The figures themselves are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import fastcodec
from bench.report import render_benchmarks_md
from proto import expert_pb2, serialize_tensor

REPO = Path(__file__).resolve().parent.parent

# benchmark -> fields its JSON must have (beyond "benchmark", "meta" and "elapsed_s")
FIELDS = {
    "codec": ["sizes_mib", "rows", "targets"],
    "latency": ["config", "rows", "targets"],
    "layer": ["config", "devices", "targets"],
    "dht": ["config", "rows", "startup_s", "declare_s_per_node", "list_all_s"],
    "faults": ["config", "segments", "summary", "ratio", "targets"],
    "memory": ["config", "base", "rows", "client", "slope_mib_per_expert", "targets"],
}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_bench_writes_every_json_with_its_fields(tmp_path):
    out = tmp_path / "results"
    report = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name, fields in FIELDS.items():
        result = json.loads((out / f"{name}.json").read_text())
        assert result["benchmark"] == name
        assert {"command", "machine", "quick"} <= set(result["meta"])
        assert result["meta"]["quick"] is True
        missing = [field for field in fields + ["elapsed_s"] if field not in result]
        assert not missing, f"{name}.json lacks {missing}"
        for target in result.get("targets", []):
            assert {"name", "value", "target", "met"} <= set(target)
    layer = json.loads((out / "layer.json").read_text())
    sides = layer["devices"]["cpu"]["rows"][0]["sides"]
    assert {"in-process", "in-process, recompute", "dmoe, 1 peer", "hivemind"} <= set(sides)
    assert all("tokens_per_s" in stats and "median" in stats for stats in sides.values())
    latency = json.loads((out / "latency.json").read_text())
    assert {(row["hidden"], row["tokens"]) for row in latency["rows"]} == {(1024, 1), (1024, 16), (64, 1), (64, 16)}
    text = report.read_text()
    for name in FIELDS:
        assert f"## {name}" in text
    assert (out / "layer.png").exists() and (out / "codec.png").exists()


def test_report_of_an_empty_directory_says_so(tmp_path):
    assert "No results yet" in render_benchmarks_md(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (7,), (2, 3, 4)])
def test_raw_bytes_prototype_is_valid_protobuf_both_ways(dtype, shape):
    tensor = (torch.randn(shape) * 10).to(dtype)
    other = tensor.t() if tensor.dim() == 2 else tensor  # non-contiguous when 2-d
    raw = fastcodec.encode([tensor, other], uid="ffn.3", response_compression=1)
    message = expert_pb2.ExpertRequest.FromString(raw)  # what an unchanged peer reads
    assert message.uid == "ffn.3" and message.response_compression == 1
    from proto import deserialize_tensor

    assert torch.equal(deserialize_tensor(message.tensors[0]), tensor)
    assert torch.equal(deserialize_tensor(message.tensors[1]), other)
    uid, (first, second), compression = fastcodec.decode(raw, request=True)
    assert (uid, compression) == ("ffn.3", 1)
    assert first.dtype == dtype and first.shape == tensor.shape and torch.equal(first, tensor)
    assert torch.equal(second, other)
    if first.numel():  # views of the received bytes, aligned for their dtype, writable
        assert first.data_ptr() % first.element_size() == 0
        first.view(-1)[0] = first.view(-1)[-1]
    # and what an unchanged peer sends, the prototype reads
    response = expert_pb2.ExpertResponse(tensors=[serialize_tensor(tensor)]).SerializeToString()
    _, (back,), _ = fastcodec.decode(response, request=False)
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_bytes_prototype_large_tensors_take_the_parallel_copy(dtype):
    tensor = torch.randn(1024, 700).to(dtype)  # >= 1 MiB: copied by torch into an uninitialised bytes object
    other = tensor.t()
    raw = fastcodec.encode([tensor, other])
    assert len(raw) >= fastcodec.PARALLEL_COPY_BYTES
    from proto import deserialize_tensor

    message = expert_pb2.ExpertResponse.FromString(raw)
    assert torch.equal(deserialize_tensor(message.tensors[1]), other)
    _, (first, second), _ = fastcodec.decode(raw, request=False)
    assert torch.equal(first, tensor) and torch.equal(second, other)
