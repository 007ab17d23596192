"""Resumable training state, written atomically and read back without executing code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ClipmedError
from ..io import atomic_write

CHECKPOINT_NAME = "last.pt"


def save_checkpoint(directory: Path, state: dict) -> None:
    """state: model/optimizer/scheduler state dicts, RNG state and progress counters (tensors and plain data)."""
    atomic_write(directory / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def load_checkpoint(directory: Path) -> dict | None:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint from an untrusted run folder cannot execute code when loaded.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: refuse, say why
        raise ClipmedError(f"refusing to load {path}: it is not a plain-tensor checkpoint ({type(exc).__name__}); "
                           "delete it to restart the run from scratch") from exc
