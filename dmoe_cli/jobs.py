"""The client jobs of `dmoe`: `train` and `infer` (argument hooks and runners, wired into `commands.COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import math

from dmoe_cli.config_args import add_config_arguments, config_from_args
from dmoe_cli.logs import setup_logging


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dmoe train`: one per field of `TrainConfig` and of its model and router configs."""
    from dmoe_cli.training import TrainConfig

    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_train_command(args: argparse.Namespace) -> int:
    """Run `dmoe train`; prints a summary; exit code 130 when stopped by Ctrl-C (after saving)."""
    from dmoe_cli.training import TrainConfig, train

    setup_logging(getattr(args, "verbose", False))
    config = config_from_args(TrainConfig, args)
    summary = train(config, progress=getattr(args, "progress", True))
    if getattr(args, "json", False):
        print(
            json.dumps(
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}, indent=2
            )
        )
    else:

        def fmt(value) -> str:
            return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

        print(
            f"step {summary['step']} ({summary['steps']} this run, {summary['elapsed']:.1f} s, "
            f"{summary['tokens_per_second']:.0f} tokens/s); loss {fmt(summary['initial_loss'])} -> "
            f"{fmt(summary['final_loss'])}, val loss {fmt(summary['val_loss'])}"
        )
        print(f"failed steps: {summary['failed_steps']}; expert stats: {summary['expert_stats']}")
        print(f"checkpoint: {summary['checkpoint']}")
        if summary["sample"]:
            print("sample:\n" + summary["sample"])
    return 130 if summary["interrupted"] else 0


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dmoe infer`: one per field of `InferConfig` and of its router config (backward knobs aside)."""
    from dmoe_cli.training import InferConfig

    add_config_arguments(parser, InferConfig)


def run_infer_command(args: argparse.Namespace) -> int:
    """Run `dmoe infer`: print the prompt and its sampled continuation."""
    from dmoe_cli.training import InferConfig, infer

    setup_logging(getattr(args, "verbose", False))
    config = config_from_args(InferConfig, args)
    print(config.prompt + infer(config), flush=True)
    return 0
