"""Mixed precision in one place: bf16 autocast on CPU and GPU, weights stay float32."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp32")


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
