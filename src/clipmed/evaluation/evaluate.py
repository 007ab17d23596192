"""Evaluation of one model on a labeled split: zero-shot (single prompt and prompt ensemble), linear probe
and image-text retrieval, all from one set of embeddings per model and split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data.datasets import readable_records
from ..data.labels import DEFAULT_MIN_CLASS_COUNT, relabel
from ..data.records import Record
from ..data.split import PreparedData
from ..knowledge.prompts import DEFAULT_TEMPLATE, check_template
from ..models.base import ClipModel
from ..options import option
from .embed import embed_images, embed_texts
from .metrics import classification_metrics, retrieval_metrics
from .probe import linear_probe
from .zeroshot import class_embeddings, zero_shot_scores


@dataclass
class EvalConfig:
    template: str = option(DEFAULT_TEMPLATE, "the single zero-shot prompt ({label} is the class name)")
    batch_size: int = 64
    precision: str = option("bf16", "autocast precision of the forward pass", choices=("bf16", "fp32"))
    n_boot: int = 1000
    seed: int = 0
    probe_shots: tuple[int, ...] = (1, 4, 16)
    probe_draws: int = 5
    retrieval_ks: tuple[int, ...] = (1, 2, 5, 10)

    def __post_init__(self) -> None:
        check_template(self.template, "--template")  # "{other}" would be a KeyError mid-evaluation


@dataclass
class Embeddings:
    """What one model produced for a split; kept for figures and galleries after the metrics."""

    records: list[Record]
    images: torch.Tensor
    texts: torch.Tensor
    labels: np.ndarray
    scores: np.ndarray  # zero-shot class scores [N, C] with the single template


def _labels(records: Sequence[Record], classes: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[r.label] for r in records], dtype=int)


def _readable(model: ClipModel, records: Sequence[Record]) -> tuple[list[Record], dict[str, str]]:
    """Records whose image still decodes, and {id: reason} of the others (skipped and reported, not fatal)."""
    keep, skipped = readable_records(records, model.preprocess.size, model.preprocess.interpolation)
    return [records[i] for i in keep], skipped


def labeled_split(prepared: PreparedData, split: str, label_field: str, *, classes: Sequence[str] | None = None,
                  min_class_count: int = DEFAULT_MIN_CLASS_COUNT) -> tuple[list[Record], list[str], list[Record]]:
    """(records of `split`, classes, train records) labeled by `label_field`: the prepared labels and classes
    for the field the data was prepared for; for another field of the source, the rows of `split` that have a
    class of it, its classes being the values with >= `min_class_count` prepared rows (or `classes`)."""
    if label_field == prepared.manifest["fields"]["label_field"]:
        return prepared.records(split), prepared.classes, prepared.records("train")
    rows = prepared.records("pool") + prepared.records("val") + prepared.records("test")
    records, chosen = relabel(prepared.records(split), rows, label_field, classes=classes,
                              min_class_count=min_class_count)
    train, _ = relabel(prepared.records("train"), rows, label_field, classes=chosen)
    return records, chosen, train


def zero_shot_metrics(model: ClipModel, image_embeddings: torch.Tensor, labels: np.ndarray, classes: Sequence[str],
                      templates: Sequence[str], config: EvalConfig, *,
                      words: Sequence[str] | None = None) -> tuple[dict, np.ndarray]:
    """The evaluate JSON for zero-shot classification with one template or an ensemble of several, and the
    class scores [N, C] it was computed from. `words` are what each class puts in the prompt (default: its name;
    a benchmark suite's `class_prompts`)."""
    weights = class_embeddings(model, words or classes, templates, precision=config.precision)
    scores = zero_shot_scores(image_embeddings, weights).numpy()
    result = classification_metrics(scores, labels, list(classes), n_boot=config.n_boot, seed=config.seed)
    if len(templates) == 1:
        result["template"] = templates[0]
    else:
        result["templates"] = list(templates)
    return result, scores


def zero_shot_evaluation(model: ClipModel, records: Sequence[Record], classes: Sequence[str],
                         config: EvalConfig = EvalConfig(), *, progress: bool = False) -> dict:
    """`clipmed evaluate`: zero-shot metrics of records whose `label` is one of `classes`."""
    records, skipped = _readable(model, records)
    images = embed_images(model, records, batch_size=config.batch_size, precision=config.precision, progress=progress)
    result, _ = zero_shot_metrics(model, images, _labels(records, classes), classes, [config.template], config)
    return {**result, "unreadable_images": skipped} if skipped else result


def full_evaluation(model: ClipModel, test: Sequence[Record], train: Sequence[Record] | None, classes: Sequence[str],
                    ensemble_templates: Sequence[str], config: EvalConfig = EvalConfig(), *,
                    progress: bool = False) -> tuple[dict, Embeddings]:
    """Zero-shot + `ensemble` + `probe` + `retrieval` (MedCLIP's evaluations) on test; the probe trains on train
    (no probe without a train split, e.g. a dataset that was never prepared).

    Test images, test captions and train images are each embedded once and shared by every evaluation.
    """
    test, skipped = _readable(model, test)
    embed = dict(batch_size=config.batch_size, precision=config.precision, progress=progress)
    test_images = embed_images(model, test, **embed)
    test_texts = embed_texts(model, [r.caption for r in test], precision=config.precision, progress=progress)
    test_labels = _labels(test, classes)

    result, scores = zero_shot_metrics(model, test_images, test_labels, classes, [config.template], config)
    result["ensemble"], _ = zero_shot_metrics(model, test_images, test_labels, classes, ensemble_templates, config)
    if train is not None:
        train, _ = _readable(model, train)
        result["probe"] = linear_probe(embed_images(model, train, **embed).numpy(), _labels(train, classes),
                                       test_images.numpy(), test_labels, list(classes), shots=config.probe_shots,
                                       draws=config.probe_draws, seed=config.seed, n_boot=config.n_boot)
    # Each test image is paired with its own caption; Precision@K counts retrieved items of the same class.
    result["retrieval"] = retrieval_metrics(test_images.numpy(), test_texts.numpy(), image_labels=test_labels,
                                            text_labels=test_labels, ks=config.retrieval_ks, n_boot=config.n_boot,
                                            seed=config.seed)
    if skipped:
        result["unreadable_images"] = skipped
    return result, Embeddings(test, test_images, test_texts, test_labels, scores)
