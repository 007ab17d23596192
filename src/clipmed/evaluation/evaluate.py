"""`clipmed evaluate`: zero-shot classification of labeled records against class names through prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data.records import Record
from ..models.base import ClipModel
from .embed import embed_images
from .metrics import classification_metrics
from .zeroshot import DEFAULT_TEMPLATE, class_embeddings, zero_shot_scores


@dataclass
class EvalConfig:
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 64
    precision: str = "bf16"
    n_boot: int = 1000
    seed: int = 0


def zero_shot_evaluation(model: ClipModel, records: Sequence[Record], classes: Sequence[str],
                         config: EvalConfig = EvalConfig(), *, image_embeddings: torch.Tensor | None = None,
                         progress: bool = False) -> dict:
    """The evaluate JSON (see metrics.classification_metrics) for records whose `label` is one of `classes`."""
    if image_embeddings is None:
        image_embeddings = embed_images(model, records, batch_size=config.batch_size, precision=config.precision,
                                        progress=progress)
    weights = class_embeddings(model, classes, [config.template], precision=config.precision)
    scores = zero_shot_scores(image_embeddings, weights).numpy()
    labels = np.array([list(classes).index(r.label) for r in records])
    result = classification_metrics(scores, labels, list(classes), n_boot=config.n_boot, seed=config.seed)
    result["template"] = config.template
    return result
