"""Training objectives as small modules: each maps normalised embeddings (+ batch side information) to a loss.

All of them are one soft cross-entropy over the images x texts logit matrix, in both directions; they differ
only in their targets:
  caption   CLIP's symmetric InfoNCE: the paired text is the only positive;
  label     images against the distinct prompts of their labels: same-label pairs are positives
            (multi-positive), or the paper's naive one-positive N x N targets;
  semantic  MedCLIP's semantic matching: targets from the similarity of concept vectors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

OBJECTIVES = ("caption", "label", "semantic")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax_j(logits_ij); rows of `targets` sum to one."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def symmetric_loss(logits: torch.Tensor, targets_i2t: torch.Tensor, targets_t2i: torch.Tensor) -> torch.Tensor:
    """(image->text + text->image) / 2; `targets_t2i` is indexed [text, image]."""
    return (soft_cross_entropy(logits, targets_i2t) + soft_cross_entropy(logits.t(), targets_t2i)) / 2


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
        if targets not in ("multi", "naive"):
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


class SemanticMatchingLoss(nn.Module):
    """MedCLIP's semantic matching loss over an images x texts batch (pairs, image-only and text-only rows).

    s_ij = cosine(concepts of image i, concepts of text j); targets y_ij = softmax_j(s_ij / tau_t) for
    image->text and softmax_i for text->image. A row without concepts keeps its own pair as its only positive;
    `pair_index[i]` is the column of image i's own text, or -1 for an image-only row. An unpaired row without
    concepts has no target and is left out of its direction's term.
    """

    def __init__(self, target_temperature: float = 1.0) -> None:
        super().__init__()
        self.target_temperature = target_temperature

    def targets(self, image_concepts: torch.Tensor, text_concepts: torch.Tensor,
                pair_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets_i2t, image rows with a target, targets_t2i, text rows with a target)."""
        similarity = F.normalize(image_concepts.float(), dim=-1) @ F.normalize(text_concepts.float(), dim=-1).t()
        own = torch.zeros_like(similarity)
        paired = (pair_index >= 0).nonzero().squeeze(-1)
        own[paired, pair_index[paired]] = 1.0
        # A concept-less entry carries no semantic information: it matches its own pair only (or nothing).
        has_image = (image_concepts.abs().sum(-1) > 0)[:, None]
        has_text = (text_concepts.abs().sum(-1) > 0)[:, None]
        i2t = torch.where(has_image, torch.softmax(similarity / self.target_temperature, dim=1), own)
        t2i = torch.where(has_text, torch.softmax(similarity.t() / self.target_temperature, dim=1), own.t())
        return i2t, i2t.sum(1) > 0, t2i, t2i.sum(1) > 0

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, image_concepts: torch.Tensor,
                text_concepts: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        logits = scale * image @ text.t()
        i2t, valid_i, t2i, valid_t = self.targets(image_concepts, text_concepts, pair_index)
        return (soft_cross_entropy(logits[valid_i], i2t[valid_i]) + soft_cross_entropy(logits.t()[valid_t], t2i[valid_t])) / 2
