"""`caption`: CLIP's symmetric InfoNCE on image-caption pairs of the caption pool (no labels)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.split import PreparedData
from .base import Objective, TrainingRows, caption_rows


class ContrastiveLoss(nn.Module):
    """CLIP's pretraining loss: finetune like you pretrain.

    `rows` (data-parallel local loss, as open_clip's `local_loss`): only the terms of pairs rows.start..stop -
    those images against every text, those texts against every image - averaged over those rows. Logits are
    [rows x N] twice instead of [N x N]; the row-weighted mean of the ranks' local losses is the global loss.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                rows: slice | None = None) -> torch.Tensor:
        if rows is None:  # one matmul: the full matrix's transpose serves text -> image
            logits = scale * image @ text.t()
            labels = torch.arange(len(image), device=image.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        labels = torch.arange(rows.start, rows.stop, device=image.device)
        return (F.cross_entropy(scale * image[rows] @ text.t(), labels)
                + F.cross_entropy(scale * text[rows] @ image.t(), labels)) / 2


class Caption(Objective):
    name = "caption"
    help = "CLIP's contrastive loss on image-caption pairs (no labels)"
    local_loss = True

    def rows(self, prepared: PreparedData, config: Any) -> TrainingRows:
        return caption_rows(prepared)

    def loss(self, config: Any, model: nn.Module) -> nn.Module:
        return ContrastiveLoss()
