"""Scores on the validation split that choose a checkpoint (and WiSE-FT's mixing weight): image<->caption
recall@1, which needs no labels, and zero-shot top-1 with the training prompt."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.records import Record
from ..evaluation.embed import embed_images, embed_texts
from ..evaluation.metrics import retrieval_metrics
from ..evaluation.zeroshot import class_embeddings, zero_shot_scores
from ..models import ClipModel
from ..objectives import Selection


def _retrieval(model: ClipModel, images: torch.Tensor, val: Sequence[Record], classes: Sequence[str],
               template: str, precision: str) -> tuple[str, float]:
    texts = embed_texts(model, [r.caption for r in val], precision=precision)
    retrieval = retrieval_metrics(images.numpy(), texts.numpy(), ks=(1,), n_boot=1)
    return "val_mean_recall_at_1", float(retrieval["mean_recall_at_1"])


def _zero_shot(model: ClipModel, images: torch.Tensor, val: Sequence[Record], classes: Sequence[str],
               template: str, precision: str) -> tuple[str, float]:
    weights = class_embeddings(model, classes, [template], precision=precision)
    predictions = zero_shot_scores(images, weights).argmax(dim=1)
    truth = torch.tensor([list(classes).index(r.label) for r in val])
    return "val_zero_shot_top1", float((predictions == truth).float().mean())


_SCORES = {"retrieval": _retrieval, "zero_shot": _zero_shot}


def validation_scores(model: ClipModel, val: Sequence[Record], classes: Sequence[str], which: Sequence[Selection], *,
                      template: str, image_precision: str = "bf16", text_precision: str = "bf16",
                      batch_size: int = 64, **image_options: Any) -> dict[str, float]:
    """{score name: value} of each selection in `which`, from one embedding of the val images; zero-shot uses
    `template`, each tower runs in the precision it trains in; `image_options` go to embed_images (the store)."""
    images = embed_images(model, val, batch_size=batch_size, precision=image_precision, **image_options)
    return dict(_SCORES[selection](model, images, val, classes, template, text_precision) for selection in which)
