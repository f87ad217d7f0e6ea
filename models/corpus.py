"""A byte-level text corpus that every machine has: the Python standard library's own source.

Tokens are bytes (a vocabulary of 256), so any text works without a tokenizer. `load_corpus()` reads the
stdlib's `*.py` files in sorted order (test folders and site-packages skipped), so two machines with the same
Python version build the same corpus; `load_corpus(path)` reads a text file or every text file under a folder.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

VOCAB_SIZE = 256
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SNIFF_BYTES = 8192


def _walk_sorted(root: Path, suffix: str | None) -> Iterator[Path]:
    """Files under `root` in a deterministic order, skipping test folders, site-packages and hidden folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if suffix is None or name.endswith(suffix):
                yield Path(dirpath) / name


def _looks_like_text(chunk: bytes) -> bool:
    return b"\0" not in chunk


def _read_capped(files: Iterator[Path], max_bytes: int) -> bytes:
    """Concatenate the text files among `files` until `max_bytes` (the last file is cut to fit)."""
    parts: list[bytes] = []
    total = 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as error:
            logger.debug("skipping unreadable %s: %s", file, error)
            continue
        if not data or not _looks_like_text(data[:_SNIFF_BYTES]):
            continue
        data = data[: max_bytes - total]
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(parts)


def load_corpus(path: str | None = None, max_bytes: int = 8_000_000) -> torch.Tensor:
    """Read a corpus as a 1-D uint8 tensor of at most `max_bytes` bytes.

    `path=None` reads the standard library's `*.py` sources (sorted, without test folders); a file path reads
    that file; a folder reads every text file under it (sorted; files with NUL bytes are taken for binary and
    skipped). Raises FileNotFoundError when the path does not exist and ValueError when it holds no text.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        data = _read_capped(_walk_sorted(root, ".py"), max_bytes)
        source = f"Python stdlib at {root}"
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus path {str(root)!r} does not exist")
        files = _walk_sorted(root, None) if root.is_dir() else iter([root])
        data = _read_capped(files, max_bytes)
        source = str(root)
    if not data:
        raise ValueError(f"no text found in corpus {source!r} (empty, or only binary files)")
    logger.info("corpus: %d bytes from %s", len(data), source)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_train_val(data: torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a corpus into its first `1 - val_fraction` (train) and its tail (validation)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = len(data) - int(len(data) * val_fraction)
    return data[:n_train], data[n_train:]


def sample_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the corpus: inputs `x` and next-byte targets `y`, both int64 `[batch_size, block_size]`."""
    if len(data) <= block_size:
        raise ValueError(f"corpus split of {len(data)} bytes is too short for block_size={block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = data[starts[:, None] + torch.arange(block_size + 1)].long()
    return windows[:, :-1], windows[:, 1:]
