"""Resumable training state, written atomically and read back without executing code.

`save_checkpoint` writes `last.pt` through a temporary sibling (`.last.pt.XXXXXXXX.tmp`) that is renamed into
place, so `last.pt` is always a complete checkpoint: the previous one or the new one. A process killed while
writing leaves only the temporary behind; `load_checkpoint` removes such leftovers before reading.

`load_checkpoint` reads with `torch.load(weights_only=True)`: a `last.pt` from an untrusted run folder cannot
run code (a pickle that names any callable other than tensor rebuilders is refused), and any file that is not a
complete clipmed checkpoint is a one-line ClipmedError.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import ClipmedError, first_line
from ..io import atomic_write

CHECKPOINT_NAME = "last.pt"
# What `train` stores; a file without these keys is not a checkpoint it can resume from.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "best", "best_epoch", "score_name")


def save_checkpoint(directory: Path, state: dict) -> None:
    """state: model/optimizer/scheduler state dicts, RNG state and progress counters (tensors and plain data)."""
    atomic_write(Path(directory) / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def _temporary_pattern(name: str | None) -> re.Pattern:
    # clipmed.io.atomic_write: tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp") in the target's folder.
    return re.compile(rf"^\.{re.escape(name)}\.[^.]+\.tmp$" if name else r"^\..+\.[^.]+\.tmp$")


def clean_stale_temporaries(directory: str | os.PathLike,
                            names: tuple[str, ...] | None = (CHECKPOINT_NAME,)) -> list[Path]:
    """Delete the temporaries of interrupted atomic writes of `names` in `directory` (not below it); return what
    was deleted. `names=None`: those of any file (`.<name>.<random>.tmp`), e.g. run.json and the CSV logs of a
    run folder.

    Only call this when no other process writes into `directory` (a resuming run owns its folder): a temporary
    of a live writer looks the same as a stale one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [_temporary_pattern(name) for name in names] if names is not None else [_temporary_pattern(None)]
    removed = []
    for entry in sorted(directory.iterdir()):
        if any(p.match(entry.name) for p in patterns) and entry.is_file():
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            removed.append(entry)
    return removed


def load_checkpoint(directory: Path) -> dict | None:
    """The state saved by `save_checkpoint` in `directory`, or None when there is none yet.

    Leftover temporaries of an interrupted write are removed first. Raises ClipmedError (one line) for a file
    that would need to run code to load, or that is not a complete checkpoint.
    """
    directory = Path(directory)
    clean_stale_temporaries(directory)
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint from an untrusted run folder cannot execute code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ClipmedError(f"refusing to load {path}: it holds objects that would run code when loaded, not only "
                               "tensors and plain data; delete it to restart the run from scratch") from None
        raise ClipmedError(f"cannot read {path}: the file is corrupt ({first_line(exc)}); delete it to restart the "
                           "run from scratch") from None
    except Exception as exc:  # truncated zip, bad magic number, I/O errors ...
        raise ClipmedError(f"cannot read {path}: the file is corrupt or not a checkpoint ({type(exc).__name__}: "
                           f"{first_line(exc)}); delete it to restart the run from scratch") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ClipmedError(f"{path} is not a clipmed training checkpoint (missing {', '.join(missing)}); delete it to "
                           "restart the run from scratch")
    return state

