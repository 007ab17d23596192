"""Zero-shot classification as pure functions on embeddings (as open_clip's zero-shot classifier)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..models.base import ClipModel
from .embed import embed_texts


def prompts_for(classes: Sequence[str], template: str) -> list[str]:
    return [template.format(label=name) for name in classes]


def class_embeddings(model: ClipModel, classes: Sequence[str], templates: Sequence[str], *,
                     precision: str = "bf16") -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings over templates, renormalised.

    One template is the paper's single prompt; several make MedCLIP's prompt ensemble.
    """
    texts = [template.format(label=name) for template in templates for name in classes]
    embeddings = embed_texts(model, texts, precision=precision).view(len(templates), len(classes), -1)
    return F.normalize(embeddings.mean(dim=0), dim=-1)


def zero_shot_scores(image_embeddings: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image to each class: [N, C]. The argmax is the prediction."""
    return image_embeddings @ class_weights.t()
