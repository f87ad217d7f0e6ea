"""Training curves: the log `dmoe train --log-csv FILE` writes, and `dmoe plot FILE` that draws it.

The log has one row per training step: ``step``, ``loss`` (the step's training loss), ``tokens_per_second``
(the step's own throughput) and ``elapsed`` (seconds since this run started). A name ending in ``.jsonl``
(or ``.json``) gives one JSON object per line, any other name CSV with a header. A resumed run appends to
the same file, so the curves continue where they stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import IO

FIELDS = ("step", "loss", "tokens_per_second", "elapsed")
SMOOTHING_STEPS = 20


def is_jsonl(path: str | Path) -> bool:
    """Whether a log at `path` is JSON lines (by its extension) rather than CSV."""
    return Path(path).suffix.lower() in (".jsonl", ".json")


class TrainingLog:
    """Appends one row per step to a CSV or JSON-lines file, flushed at each row so a crash loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = is_jsonl(self.path)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file: IO[str] = open(self.path, "a", newline="", encoding="utf-8")
        self._csv = None if self._jsonl else csv.writer(self._file)
        if self._csv is not None and fresh:
            self._csv.writerow(FIELDS)

    def write(self, step: int, loss: float, tokens_per_second: float, elapsed: float) -> None:
        """Add one step's figures."""
        row = (step, round(loss, 6), round(tokens_per_second, 1), round(elapsed, 3))
        if self._csv is not None:
            self._csv.writerow(row)
        else:
            self._file.write(json.dumps(dict(zip(FIELDS, row, strict=True))) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_training_log(path: str | Path) -> dict[str, list[float]]:
    """The columns of a training log (CSV or JSON lines); raises ValueError for a file that is not one."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if is_jsonl(path):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = [row for row in csv.DictReader(text.splitlines()) if row.get("step") != "step"]
        columns = {name: [float(row[name]) for row in rows] for name in FIELDS}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a training log of `dmoe train --log-csv` (columns {', '.join(FIELDS)}): {exc!r}"
        ) from None
    if not rows:
        raise ValueError(f"{path} holds no training steps yet")
    return columns


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start); NaNs are skipped."""
    averaged, recent = [], []
    for value in values:
        recent.append(value)
        if len(recent) > window:
            recent.pop(0)
        finite = [v for v in recent if math.isfinite(v)]
        averaged.append(sum(finite) / len(finite) if finite else math.nan)
    return averaged


def plot_training_log(path: str | Path, output: str | Path | None = None) -> Path:
    """Draw the loss and tokens/s of a training log over the steps as a PNG; returns where it was written.

    `output` defaults to the log's name with ``.png``. The raw figures are drawn thin, a moving average over
    `SMOOTHING_STEPS` steps on top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_training_log(path)
    output = Path(output) if output is not None else Path(path).with_suffix(".png")
    steps = columns["step"]
    window = max(1, min(SMOOTHING_STEPS, len(steps) // 5))
    figure, (loss_axes, rate_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, constrained_layout=True)
    try:
        for axes, name, label, colour in (
            (loss_axes, "loss", "training loss (nats/byte)", "tab:blue"),
            (rate_axes, "tokens_per_second", "tokens/s", "tab:green"),
        ):
            axes.plot(steps, columns[name], color=colour, alpha=0.3, linewidth=0.8)
            axes.plot(steps, moving_average(columns[name], window), color=colour, linewidth=1.8)
            axes.set_ylabel(label)
            axes.grid(True, alpha=0.3)
        rate_axes.set_xlabel("step")
        rate_axes.set_ylim(bottom=0)
        minutes = columns["elapsed"][-1] / 60
        loss_axes.set_title(f"{Path(path).name}: {len(steps)} steps, last run {minutes:.1f} min")
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=110)
    finally:
        plt.close(figure)
    return output


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dmoe plot`."""
    parser.add_argument("log", metavar="FILE", help="a training log written by `dmoe train --log-csv FILE`")
    parser.add_argument("-o", "--output", metavar="PNG", help="where to write the picture (default: FILE with .png)")


def run_plot_command(args: argparse.Namespace) -> int:
    """`dmoe plot`: draw the log, print where the picture went."""
    print(f"wrote {plot_training_log(args.log, args.output)}")
    return 0
