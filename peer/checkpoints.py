"""Atomic expert checkpoints: write to a temporary file, fsync, rename; the previous good one is kept.

Layout in the checkpoint directory, per expert uid:
    <uid>.ckpt       the latest checkpoint
    <uid>.prev.ckpt  the one before it, used when the latest is corrupt or truncated
A file is a magic line, the SHA-256 of the payload, and the payload (`torch.save` of the expert's state,
loaded back with `weights_only=True`), so corruption anywhere is detected, never loaded silently.

`atomic_write_bytes` is the one atomic file write dmoe has; the peer's endpoint file uses it too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAGIC = b"DMOE-CKPT-1\n"
_DIGEST_SIZE = hashlib.sha256().digest_size


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used; the message names the file and what is wrong."""


def checkpoint_path(directory: str | Path, uid: str, *, previous: bool = False) -> Path:
    """Where the (latest or previous) checkpoint of `uid` lives."""
    return Path(directory) / (f"{uid}.prev.ckpt" if previous else f"{uid}.ckpt")


def atomic_write_bytes(
    path: str | Path, data: bytes | memoryview | Sequence[bytes | memoryview], *, previous: str | Path | None = None
) -> Path:
    """Replace `path` with `data` atomically: a reader sees the old file or the new one, never half of either.

    The data goes to a temporary file in the same directory, is fsynced, and is renamed over `path`; the
    directory is fsynced too, so the new file survives a power cut. `data` is bytes or a sequence of byte
    pieces written in order (no copy is made to join them). With `previous`, an existing `path` is moved
    there just before the new file takes its place, so one good version is on disk at every moment.
    """
    path = Path(path)
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            for piece in pieces:
                file.write(piece)
            file.flush()
            os.fsync(file.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def save_checkpoint(directory: str | Path, uid: str, state: dict) -> Path:
    """Write `state` atomically as the latest checkpoint of `uid`; the old latest becomes the previous one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    latest, previous = checkpoint_path(directory, uid), checkpoint_path(directory, uid, previous=True)
    return atomic_write_bytes(latest, (MAGIC, hashlib.sha256(payload).digest(), payload), previous=previous)


def read_checkpoint_file(path: str | Path) -> dict:
    """Read and verify one checkpoint file; `CheckpointError` naming the file if it is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    header = len(MAGIC) + _DIGEST_SIZE
    if not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a dmoe checkpoint (bad header; truncated or overwritten?)")
    if len(data) < header:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    digest, payload = data[len(MAGIC) : header], memoryview(data)[header:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch, {len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be decoded: {exc}") from exc


def load_checkpoint(directory: str | Path, uid: str) -> dict | None:
    """The newest usable checkpoint of `uid`, or None when there is none at all.

    A damaged latest checkpoint is reported (error log naming the file) and the previous one is used.
    When checkpoint files exist but none is usable, `CheckpointError` is raised: never a silent fresh start.
    """
    errors = []
    for previous in (False, True):
        path = checkpoint_path(directory, uid, previous=previous)
        if not path.exists():
            continue
        try:
            state = read_checkpoint_file(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:  # reported here only when the previous checkpoint saves the day; else the raise below says it
            logger.error("%s; resuming %s from the previous checkpoint %s", "; ".join(errors), uid, path)
        return state
    if errors:
        raise CheckpointError(
            f"no usable checkpoint for {uid} in {directory}: "
            + "; ".join(errors)
            + ". Move the damaged files away to start this expert afresh."
        )
    return None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
