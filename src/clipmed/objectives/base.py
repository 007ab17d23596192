"""What every objective gives the training loop: the rows it trains on, how a batch is made, the loss, how a
checkpoint is selected and which texts are fixed (encoded once when the text tower is locked).

The loop (`training/train.py`, `training/step.py`) only calls these; `objectives/__init__.py` maps names to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..data.records import Record, RecordTable, TextColumn
from ..data.split import PreparedData

# How a checkpoint is chosen on the validation split: "retrieval" (image<->caption recall@1, needs no labels)
# or "zero_shot" (top-1 with the training prompt, needs labels).
Selection = Literal["retrieval", "zero_shot"]


@dataclass
class TrainingRows:
    """What one objective trains on, row by row.

    records: the rows, column-wise (a RecordTable: compact at a million rows); texts: the text of each row
    (caption or label prompt), None for an image-only row; has_image: False for a text-only row (its image was
    rejected by prepare); labels: class indices (label objective); concepts: concept vectors (semantic objective).
    """

    records: RecordTable
    texts: Sequence[str | None]
    has_image: list[bool]
    classes: list[str]
    labels: torch.Tensor | None = None
    concepts: torch.Tensor | None = None

    def subset(self, keep: list[int]) -> "TrainingRows":
        texts = self.texts.take(keep) if isinstance(self.texts, TextColumn) else [self.texts[i] for i in keep]
        return TrainingRows(self.records.take(keep), texts, [self.has_image[i] for i in keep], self.classes,
                            self.labels[keep] if self.labels is not None else None,
                            self.concepts[keep] if self.concepts is not None else None)


@dataclass
class Batch:
    """What one step encodes and what its loss needs beside the embeddings.

    texts_sharded is False when every rank encodes all texts (the few distinct prompts of a label batch).
    pixels: uint8 pixels of this rank's share of `images` (the trainer's loader fills them; None when a locked
    image tower's cached features stand in for them).
    """

    images: list[Record]
    texts: list[str]
    loss_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    texts_sharded: bool = True
    pixels: torch.Tensor | None = None


def caption_rows(prepared: PreparedData) -> TrainingRows:
    """Image-caption pairs of the caption pool (train plus every usable row outside val/test)."""
    records = prepared.records("pool")
    return TrainingRows(records, records.column("caption"), [True] * len(records), prepared.classes)


def pair_batch(rows: TrainingRows, index: torch.Tensor) -> Batch:
    """Rows `index` as image-text pairs, the i-th image with the i-th text."""
    picked = index.tolist()
    return Batch(list(rows.records.take(picked)), [rows.texts[i] for i in picked])


class Objective:
    """One training objective. Subclasses set the class attributes and implement `rows`, `batch` and `loss`.

    `config` below is the run's TrainConfig (it holds every objective's options, declared in its module).
    """

    name: ClassVar[str]
    help: ClassVar[str]
    selection: ClassVar[Selection] = "retrieval"
    # Trained by `clipmed reproduce` unless --objectives says otherwise.
    in_reproduce: ClassVar[bool] = True
    # Whether --local-loss (each process computes only its own rows' terms) applies.
    local_loss: ClassVar[bool] = False
    # What reproduce sets for this objective's run, beside the shared training options.
    reproduce_overrides: ClassVar[dict[str, Any]] = {}

    def rows(self, prepared: PreparedData, config: Any) -> TrainingRows:
        raise NotImplementedError

    def batch(self, rows: TrainingRows, index: torch.Tensor, config: Any) -> Batch:
        return pair_batch(rows, index)

    def loss(self, config: Any, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, config: Any) -> None:
        """Add what the objective needs to a freshly loaded model, before the optimizer sees it (SigLIP's bias)."""

    def fixed_texts(self, rows: TrainingRows, config: Any) -> list[str]:
        """Every text a batch can hold: what a locked text tower's feature cache is built from."""
        return [t for t in rows.texts if t is not None]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax_j(logits_ij); rows of `targets` sum to one."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def symmetric_loss(logits: torch.Tensor, targets_i2t: torch.Tensor, targets_t2i: torch.Tensor) -> torch.Tensor:
    """(image->text + text->image) / 2; `targets_t2i` is indexed [text, image]."""
    return (soft_cross_entropy(logits, targets_i2t) + soft_cross_entropy(logits.t(), targets_t2i)) / 2
