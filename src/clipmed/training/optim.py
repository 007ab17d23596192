"""AdamW with per-origin learning rates and no decay on biases, norms and temperature; warmup then cosine."""

from __future__ import annotations

import math

import torch

from ..models.base import ClipModel
from .config import TrainConfig


def build_optimizer(model: ClipModel, config: TrainConfig) -> tuple[torch.optim.Optimizer, list[dict]]:
    """AdamW over the trainable parameters; returns it and a JSON-able description of its groups."""
    rates = {"clip": config.resolved_lr_clip(), "pretrained": config.lr_pretrained, "new": config.lr_new}
    locked = {"image": config.lock_image, "text": config.lock_text, "head": False}
    groups: dict[tuple[str, bool], list] = {}
    for info in model.parameter_info():
        if locked[info.tower]:
            info.param.requires_grad_(False)
        if not info.param.requires_grad:  # locked, or a tower weight under LoRA adapters
            continue
        groups.setdefault((info.origin, info.no_decay), []).append(info.param)
    param_groups, described = [], []
    for (origin, no_decay), params in sorted(groups.items()):
        decay = 0.0 if no_decay else config.weight_decay
        param_groups.append({"params": params, "lr": rates[origin], "weight_decay": decay})
        described.append({"origin": origin, "lr": rates[origin], "weight_decay": decay,
                          "n_tensors": len(params), "n_params": sum(p.numel() for p in params)})
    # fused: one pass over each parameter's memory per step instead of one per elementwise op; on the CPU a
    # ViT-B/32 step takes 0.04 s instead of 0.17-0.28 s with foreach. Devices without the fused kernel use foreach.
    fused = torch.device(config.device).type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6, fused=fused, foreach=not fused)
    return optimizer, described


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, then each moment tensor put in its parameter's memory layout: the fused step
    walks a parameter and its moments in memory order, so a checkpoint written with another layout (an image
    tower switched to channels_last) would otherwise pair the wrong elements."""
    optimizer.load_state_dict(state)
    for param, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                values[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
