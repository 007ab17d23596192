"""`label`: each image against the prompt of its label on the balanced train split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.split import PreparedData
from ..knowledge.prompts import DEFAULT_TEMPLATE, check_template
from ..options import option
from .base import Batch, Objective, TrainingRows, symmetric_loss
from .caption import ContrastiveLoss

LABEL_TARGETS = ("multi", "naive")


@dataclass
class LabelOptions:
    label_template: str = option(DEFAULT_TEMPLATE, "prompt the label objective trains on and zero-shot checkpoint "
                                 "selection scores with")
    label_targets: str = option("multi", "multi: same-label pairs are positives; naive: the paper's one-positive "
                                "loss", choices=LABEL_TARGETS)

    def __post_init__(self) -> None:
        check_template(self.label_template, "--label-template")  # checked before training, not at its first step


class LabelLoss(nn.Module):
    """Images against the prompts of their labels; `prompts` holds each distinct prompt of the batch once.

    `multi`: logits are images x distinct prompts. Image->text is a cross-entropy over the distinct prompts, so
    a same-label image's identical prompt is never a competing negative; text->image spreads each prompt's
    target uniformly over all images of its label (multi-positive). `naive`: the paper's setup, the N x N
    matrix of one prompt per image with the own pair as the only positive (identical prompts of same-label
    images compete, so the loss has a floor of log(#same-label) and never reaches zero).
    """

    def __init__(self, targets: str = "multi") -> None:
        super().__init__()
        if targets not in LABEL_TARGETS:
            raise ValueError(f"label targets must be 'multi' or 'naive', not {targets!r}")
        self.targets = targets

    def forward(self, image: torch.Tensor, prompts: torch.Tensor, scale: torch.Tensor,
                prompt_index: torch.Tensor) -> torch.Tensor:
        """prompt_index[i]: the row of `prompts` that holds image i's prompt."""
        if self.targets == "naive":
            return ContrastiveLoss()(image, prompts[prompt_index], scale)
        logits = scale * image @ prompts.t()
        positives = F.one_hot(prompt_index, len(prompts)).to(logits.dtype)
        targets_t2i = (positives / positives.sum(dim=0, keepdim=True)).t()
        return symmetric_loss(logits, positives, targets_t2i)


class Label(Objective):
    name = "label"
    help = 'each image against "A medical image of {label}" on the balanced train split'
    selection = "zero_shot"

    def rows(self, prepared: PreparedData, config: Any) -> TrainingRows:
        records = prepared.records("train")
        return TrainingRows(records, [config.label_template.format(label=r.label) for r in records],
                            [True] * len(records), prepared.classes,
                            labels=torch.tensor([prepared.classes.index(r.label) for r in records]))

    def batch(self, rows: TrainingRows, index: torch.Tensor, config: Any) -> Batch:
        # A batch holds few distinct prompts: encode each once (the loss indexes them per image).
        distinct, prompt_index = rows.labels[index].unique(return_inverse=True)
        prompts = [config.label_template.format(label=rows.classes[c]) for c in distinct.tolist()]
        return Batch(list(rows.records.take(index.tolist())), prompts, {"prompt_index": prompt_index},
                     texts_sharded=False)

    def loss(self, config: Any, model: nn.Module) -> nn.Module:
        return LabelLoss(config.label_targets)

    def fixed_texts(self, rows: TrainingRows, config: Any) -> list[str]:
        return [config.label_template.format(label=c) for c in rows.classes]
