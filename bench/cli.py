"""`dmoe bench [NAME ...] [--quick] [--out DIR]`: run benchmarks, print their tables, write JSON and BENCHMARKS.md.

Wired into `dmoe` as the `bench` subcommand through `add_bench_arguments` and `run_bench_command`; also
runnable as `python -m bench`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import DEFAULT_OUT, REPO, format_table, log, machine_info, tune_allocator, write_result
from bench.registry import BENCHMARKS


@dataclass
class BenchContext:
    """What a benchmark's `run(ctx)` gets: the mode, where to write, the device and thread settings."""

    quick: bool = False
    out: Path = DEFAULT_OUT
    device: str = "auto"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def log(self, message: str) -> None:
        log(message)

    @property
    def cuda(self) -> bool:
        """Whether the GPU variants run: `--device cuda`, or `auto` with a CUDA device present."""
        if self.device == "cpu":
            return False
        import torch

        return torch.cuda.is_available()


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dmoe bench`."""
    names = ", ".join(BENCHMARKS)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {names}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CI smoke test (about a minute)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON results and plots")
    parser.add_argument(
        "--report",
        default=None,
        help="where to write the markdown report (default: BENCHMARKS.md in the repository for the default --out, "
        "else OUT/BENCHMARKS.md); 'none' to skip",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: also run the layer benchmark with experts on CUDA when a GPU is present",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch compute threads for every side of the layer benchmark (default: all cores)",
    )


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks; returns 0 when all ran, 1 when one failed (the others still run)."""
    names = list(args.names) or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    from dmoe_cli.logs import setup_logging

    setup_logging(getattr(args, "verbose", False))
    ctx = BenchContext(quick=args.quick, out=Path(args.out), device=args.device, threads=args.threads)
    tuned = tune_allocator()
    _stop_on_sigterm()
    command = "dmoe bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "quick": ctx.quick,
        "machine": machine_info(),
        "allocator_tuned": tuned,
        "threads": ctx.threads,
    }
    failed = []
    for name in names:
        module_name, _help = BENCHMARKS[name]
        module = importlib.import_module(module_name)
        log(f"== {name}: {_help}")
        started = time.monotonic()
        try:
            result = module.run(ctx)
        except Exception:
            failed.append(name)
            log(f"== {name} FAILED:\n{traceback.format_exc()}")
            continue
        result["elapsed_s"] = time.monotonic() - started
        path = write_result(ctx.out, name, result, meta=meta)
        headers, rows = module.table(result)
        print(f"\n{name} ({result['elapsed_s']:.0f} s; {path})")
        print(format_table(headers, rows))
        for target in result.get("targets", []):
            print(
                f"  target {target['name']}: {_fmt(target['value'])} ({target['target']}): "
                f"{'met' if target['met'] else 'MISSED'}"
            )
        sys.stdout.flush()
    report = _report_path(args, ctx.out)
    if report is not None:
        from bench.report import write_report

        write_report(ctx.out, report)
        log(f"wrote {report}")
    return 1 if failed else 0


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that every benchmark stops the servers it started."""
    if threading.current_thread() is threading.main_thread():

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)


def _report_path(args: argparse.Namespace, out: Path) -> Path | None:
    if args.report == "none":
        return None
    if args.report:
        return Path(args.report)
    if out.resolve() == DEFAULT_OUT.resolve():
        return REPO / "BENCHMARKS.md"
    return out / "BENCHMARKS.md"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    """`python -m bench`: the same as `dmoe bench`."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = argparse.ArgumentParser(prog="dmoe bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
