"""Logging set-up for the command line: one readable format, hivemind's chatter kept down."""

from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with --verbose or DMOE_LOG_LEVEL); hivemind at WARNING."""
    level = os.environ.get("DMOE_LOG_LEVEL", "DEBUG" if verbose else "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for name in ("hivemind", "grpc", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)
