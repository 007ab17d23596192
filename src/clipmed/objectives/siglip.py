"""`siglip`: SigLIP's pairwise sigmoid loss on image-caption pairs (Zhai et al. 2023), with a learnable
temperature and bias that are saved with the model (zero-shot probabilities become sigmoid(t * cos + b))."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.split import PreparedData
from ..models.base import MAX_LOGIT_SCALE
from ..options import option
from .base import Objective, TrainingRows, caption_rows


@dataclass
class SiglipOptions:
    siglip_init_scale: float = option(10.0, "SigLIP: the temperature t a model without a bias starts from "
                                      "(the paper's t' = log 10)", above=0, max=MAX_LOGIT_SCALE)
    # Beyond +-MAX_LOGIT_SCALE (the largest scaled cosine) the bias alone decides every pair's sigmoid.
    siglip_init_bias: float = option(-10.0, "SigLIP: the bias b a model without one starts from (the paper's -10)",
                                     min=-MAX_LOGIT_SCALE, max=MAX_LOGIT_SCALE)


class SigmoidLoss(nn.Module):
    """-1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ij = 1 for a pair and -1 otherwise: every image-text
    entry is its own binary problem, so no softmax normalises over the batch. `bias` is the model's parameter."""

    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * image @ text.t() + self.bias
        signs = 2 * torch.eye(len(image), len(text), device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / len(image)


class Siglip(Objective):
    name = "siglip"
    help = "SigLIP's pairwise sigmoid loss on image-caption pairs (no labels)"
    in_reproduce = False

    def rows(self, prepared: PreparedData, config: Any) -> TrainingRows:
        return caption_rows(prepared)

    def prepare_model(self, model: nn.Module, config: Any) -> None:
        if model.logit_bias is None:  # a model trained with SigLIP before keeps its temperature and bias
            model.add_logit_bias(config.siglip_init_bias, math.log(config.siglip_init_scale))

    def loss(self, config: Any, model: nn.Module) -> nn.Module:
        return SigmoidLoss(model.logit_bias)
