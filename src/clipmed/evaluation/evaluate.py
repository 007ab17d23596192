"""Evaluation of one model on a labeled split: zero-shot (single prompt and prompt ensemble), linear probe
and image-text retrieval, all from one set of embeddings per model and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..data.records import Record
from ..models.base import ClipModel
from .embed import embed_images, embed_texts
from .metrics import classification_metrics, retrieval_metrics
from .probe import linear_probe
from .zeroshot import DEFAULT_TEMPLATE, class_embeddings, zero_shot_scores


@dataclass
class EvalConfig:
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 64
    precision: str = "bf16"
    n_boot: int = 1000
    seed: int = 0
    probe_shots: tuple[int, ...] = (1, 4, 16)
    probe_draws: int = 5
    retrieval_ks: tuple[int, ...] = (1, 2, 5, 10)


@dataclass
class Embeddings:
    """What one model produced for a split; kept for figures and galleries after the metrics."""

    images: torch.Tensor
    texts: torch.Tensor | None = None
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=int))


def _labels(records: Sequence[Record], classes: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[r.label] for r in records], dtype=int)


def zero_shot_metrics(model: ClipModel, image_embeddings: torch.Tensor, labels: np.ndarray, classes: Sequence[str],
                      templates: Sequence[str], config: EvalConfig) -> dict:
    """The evaluate JSON for zero-shot classification with one template or an ensemble of several."""
    weights = class_embeddings(model, classes, templates, precision=config.precision)
    scores = zero_shot_scores(image_embeddings, weights).numpy()
    result = classification_metrics(scores, labels, list(classes), n_boot=config.n_boot, seed=config.seed)
    if len(templates) == 1:
        result["template"] = templates[0]
    else:
        result["templates"] = list(templates)
    return result


def zero_shot_evaluation(model: ClipModel, records: Sequence[Record], classes: Sequence[str],
                         config: EvalConfig = EvalConfig(), *, progress: bool = False) -> dict:
    """`clipmed evaluate`: zero-shot metrics of records whose `label` is one of `classes`."""
    images = embed_images(model, records, batch_size=config.batch_size, precision=config.precision, progress=progress)
    return zero_shot_metrics(model, images, _labels(records, classes), classes, [config.template], config)


def full_evaluation(model: ClipModel, test: Sequence[Record], train: Sequence[Record], classes: Sequence[str],
                    ensemble_templates: Sequence[str], config: EvalConfig = EvalConfig(), *,
                    progress: bool = False) -> tuple[dict, Embeddings]:
    """Zero-shot + `ensemble` + `probe` + `retrieval` (MedCLIP's evaluations) on test; the probe trains on train.

    Test images, test captions and train images are each embedded once and shared by every evaluation.
    """
    embed = dict(batch_size=config.batch_size, precision=config.precision, progress=progress)
    test_images = embed_images(model, test, **embed)
    test_texts = embed_texts(model, [r.caption for r in test], precision=config.precision, progress=progress)
    train_images = embed_images(model, train, **embed)
    test_labels, train_labels = _labels(test, classes), _labels(train, classes)

    result = zero_shot_metrics(model, test_images, test_labels, classes, [config.template], config)
    result["ensemble"] = zero_shot_metrics(model, test_images, test_labels, classes, ensemble_templates, config)
    result["probe"] = linear_probe(train_images.numpy(), train_labels, test_images.numpy(), test_labels, list(classes),
                                   shots=config.probe_shots, draws=config.probe_draws, seed=config.seed,
                                   n_boot=config.n_boot)
    # Each test image is paired with its own caption; Precision@K counts retrieved items of the same class.
    result["retrieval"] = retrieval_metrics((test_images @ test_texts.t()).numpy(), image_labels=test_labels,
                                            text_labels=test_labels, ks=config.retrieval_ks, n_boot=config.n_boot,
                                            seed=config.seed)
    return result, Embeddings(test_images, test_texts, test_labels)
