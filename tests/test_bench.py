"""`dmoe bench`: every benchmark runs in quick mode and writes the JSON fields the report reads. The figures
themselves are never asserted. (The codec it measures, `proto.wire`, is tested in tests/test_wire.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import render_benchmarks_md

REPO = Path(__file__).resolve().parent.parent

# benchmark -> fields its JSON must have (beyond "benchmark", "meta" and "elapsed_s")
FIELDS = {
    "codec": ["sizes_mib", "rows", "targets"],
    "latency": ["config", "rows", "targets"],
    "layer": ["config", "devices", "targets"],
    "dht": ["config", "rows", "startup_s", "declare_s_per_node", "list_all_s"],
    "faults": ["config", "segments", "summary", "ratio", "targets"],
    "memory": ["config", "base", "rows", "client", "slope_mib_per_expert", "targets"],
    "grid": ["config", "grids", "nodes", "round_ms_fit", "round_ms_projected", "record_bytes"],
    "relay": ["config", "latency", "training"],
}


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_bench_writes_every_json_with_its_fields(tmp_path):
    out = tmp_path / "results"
    report = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=640,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    failures = [block for block in proc.stderr.split("== ")[1:] if " FAILED:" in block.splitlines()[0]]
    assert proc.returncode == 0, "\n".join(failures)[-8000:] or proc.stdout[-3000:] + proc.stderr[-6000:]
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
    assert (out / "layer.png").exists() and (out / "codec.png").exists() and (out / "grid.png").exists()


def test_report_of_an_empty_directory_says_so(tmp_path):
    assert "No results yet" in render_benchmarks_md(tmp_path)
