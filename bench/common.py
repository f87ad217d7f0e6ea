"""What every benchmark shares: interleaved timing, statistics, the machine's description, JSON and tables.

Fairness rules that every comparison here follows (and BENCHMARKS.md states):

* both (or all) sides run in the same run of `dmoe bench`, interleaved round by round in a rotating order, so
  that a slow minute of a shared machine hits every side alike; figures are medians with their spread;
* every process that computes (this one, dmoe peers, the hivemind server) gets the same number of torch
  compute threads (`torch.set_num_threads`, and `--compute-threads` for peers) and the same allocator
  settings (`tune_allocator` here, `ALLOCATOR_ENV` for child processes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"

# glibc returns freed blocks above a dynamic threshold to the OS at once, so a training step that allocates
# ~0.5 GB of gradients takes ~300k page faults every time (measured: 0.2-0.5 s per step at hidden 1024, and
# most of the run-to-run spread). These keep freed memory in the heap for reuse; used on every side alike.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> bool:
    """Apply `ALLOCATOR_ENV` to this (already running) process through `mallopt`; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    os.environ.update(ALLOCATOR_ENV)  # and every child started from now on
    return bool(ok)


def child_env(threads: int | None = None, *, tuned_allocator: bool = True) -> dict[str, str]:
    """Environment for a server process started by a benchmark: allocator settings, thread counts, quiet logs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}
    for key in ALLOCATOR_ENV:
        env.pop(key, None)
    if tuned_allocator:
        env.update(ALLOCATOR_ENV)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict:
    """Median, p10, p90, p99, min and count of a list of seconds (or any figures)."""
    return {
        "median": statistics.median(samples) if samples else math.nan,
        "p10": percentile(samples, 10),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "min": min(samples) if samples else math.nan,
        "n": len(samples),
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


@dataclass
class Side:
    """One contender of a comparison: `run()` does one timed unit of work and returns nothing.

    A side stops once it has `reps` samples, or once it has spent `budget` seconds and has `min_reps`.
    `setup()` (untimed) runs before every repetition, for instance to zero gradients.
    """

    name: str
    run: Callable[[], object]
    reps: int = 5
    budget: float = math.inf
    min_reps: int = 2
    warmup: int = 1
    setup: Callable[[], object] | None = None
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    gave_up: bool = False  # set after a second TimeoutError: a side that hangs twice is not given another minute

    @property
    def done(self) -> bool:
        spent = sum(self.samples)
        return len(self.samples) >= self.reps or (spent >= self.budget and len(self.samples) >= self.min_reps)


def interleave(sides: Sequence[Side], *, max_errors: int = 3, log: Callable[[str], None] | None = None) -> None:
    """Run every side's warm-up, then rounds of one timed repetition per side, rotating the order each round.

    A side whose `run` raises `max_errors` times is given up (its errors are kept in `Side.errors`).
    """
    for side in sides:
        for _ in range(side.warmup):
            if not side.gave_up:
                _attempt(side, timed=False)
    round_index = 0
    while True:
        active = [s for s in sides if not s.done and not s.gave_up and len(s.errors) < max_errors]
        if not active:
            break
        shift = round_index % len(active)
        for side in active[shift:] + active[:shift]:
            _attempt(side, timed=True)
        round_index += 1
        if log is not None:
            log(f"  round {round_index}: " + ", ".join(f"{s.name} {len(s.samples)}" for s in sides))


def _attempt(side: Side, *, timed: bool) -> None:
    try:
        if side.setup is not None:
            side.setup()
        started = time.perf_counter()
        side.run()
        elapsed = time.perf_counter() - started
    except Exception as exc:  # a failing side is reported, never fatal for the others
        side.errors.append(f"{type(exc).__name__}: {exc}"[:500])
        timeouts = sum(error.startswith("TimeoutError") for error in side.errors)
        side.gave_up = side.gave_up or timeouts >= 2
        return
    if timed:
        side.samples.append(elapsed)


# ---------------------------------------------------------------------------------------------- the machine


def machine_info() -> dict:
    """CPU, cores, memory, GPU, OS, versions of the stack, the load average and the git commit."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(_meminfo_kb("MemTotal") / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg": _loadavg(),
        "commit": _git_commit(),
    }
    for package in ("torch", "hivemind", "grpcio", "protobuf", "numpy", "dmoe"):
        info[package] = _version(package)
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - a broken CUDA install must not stop the benchmarks
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kb(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def memory_kb(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB, from /proc."""
    figures = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(line.split()[1])
    except OSError:
        pass
    return figures


# ---------------------------------------------------------------------------------------------- output


def write_result(out_dir: Path, name: str, payload: dict, *, meta: dict) -> Path:
    """Write `OUT/NAME.json`: `{"benchmark": NAME, "meta": {...}, **payload}`; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {"benchmark": name, "meta": {**meta, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, **payload}
    path.write_text(json.dumps(_clean(document), indent=1) + "\n")
    return path


def _clean(value):
    """JSON-safe: NaN and Inf become null, tuples lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table with right-aligned figures (used for the terminal and, as markdown, for the report)."""
    rows = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(
        str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The same table as GitHub markdown."""
    rows = [[_cell(c) for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if magnitude >= 0.1 or magnitude == 0 else f"{value:.3f}"
    return str(value)


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)
