"""The compute device a command runs on, checked before any model loads: a name torch knows, present here."""

from __future__ import annotations

import torch

from .errors import ClipmedError, first_line

KINDS = ("cpu", "cuda", "mps")


def check_device(name: str) -> torch.device:
    """`name` as a torch device; a one-line error when torch does not know it or this machine lacks it (torch
    would fail later, with a traceback, after the model has loaded)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ClipmedError(f"--device {name!r} is no device ({first_line(exc)}): use cpu, cuda, cuda:N or mps") from None
    if device.type not in KINDS:
        raise ClipmedError(f"--device {name!r}: clipmed runs on cpu, cuda (cuda:N) or mps")
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[device.type]
    if not present:
        raise ClipmedError(f"--device {name}: this machine has no {device.type} device that torch can use; "
                           "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ClipmedError(f"--device {name}: there are {torch.cuda.device_count()} cuda devices (cuda:0 to "
                           f"cuda:{torch.cuda.device_count() - 1})")
    return device
