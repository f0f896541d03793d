"""Checkpoints and other run files, written atomically.

A file is written to a temporary name in the same directory, flushed to disk, then renamed
over the target: a run killed at any moment leaves either the old file or the new one, never
half of one, and no temporary file once the write has finished or failed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or from another configuration."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_atomic(obj, path) -> None:
    """torch.save(obj) to `path`, atomically."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def write_json_atomic(obj, path) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    _atomic(Path(path), lambda f: f.write(data))


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass the checkpoint.pt of a run folder "
                              f"(imaml-fast train --out DIR writes DIR/checkpoint.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise CheckpointError(f"{path} is not a readable imaml_fast checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); it may be truncated or from another program") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imaml_fast checkpoint of format {FORMAT}")
    return ckpt
