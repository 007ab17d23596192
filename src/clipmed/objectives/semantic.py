"""`semantic`: MedCLIP's semantic matching loss over decoupled batches of pairs, image-only and text-only rows,
soft targets from the similarity of concepts extracted from the captions (no labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch import nn
from torch.nn import functional as F

from ..data.records import TextColumn
from ..data.split import PreparedData
from ..options import option
from .base import Batch, Objective, TrainingRows, soft_cross_entropy

ENTITY_SOURCES = ("captions", "labels", "both")


@dataclass
class SemanticOptions:
    semantic_temperature: float = option(0.1, "tau_t of the semantic matching targets softmax(s / tau_t)", above=0)
    entities_from: str = option("captions", "where the semantic objective's concepts come from",
                                choices=ENTITY_SOURCES)
    vocabulary: str | None = option(None, "a concepts YAML replacing the packaged vocabulary", metavar="FILE")


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


class Semantic(Objective):
    name = "semantic"
    help = "MedCLIP's semantic matching: soft targets from concepts extracted from the captions (no labels)"
    # The semantic model in the report uses concepts from captions only: it answers how far unlabeled data goes
    # (its checkpoint selection needs no labels either).
    reproduce_overrides = {"entities_from": "captions"}

    def rows(self, prepared: PreparedData, config: Any) -> TrainingRows:
        """The pool plus text-only and image-only rows (MedCLIP's decoupled batches), column-wise: a row costs its
        caption's bytes and its concept vector, never a Record or a Python string."""
        import pyarrow as pa

        from ..knowledge import ConceptExtractor, Vocabulary

        pairs, text_only = prepared.records("pool"), prepared.text_only_records()
        with_text = pairs + text_only
        image_only = prepared.image_only_records()
        vocabulary = Vocabulary.load(config.vocabulary) if config.vocabulary else Vocabulary.default()
        extractor = ConceptExtractor(vocabulary)
        concepts = extractor.entity_matrix(with_text.column("caption"), with_text.column("label"),
                                           source=config.entities_from)
        # An image-only row has no caption: its concepts come from its label, whatever --entities-from says.
        label_concepts = extractor.entity_matrix([None] * len(image_only), image_only.column("label"),
                                                 source="labels")
        texts = TextColumn(pa.concat_arrays([with_text.column("caption").to_arrow(),
                                             pa.nulls(len(image_only), pa.string())]))
        return TrainingRows(with_text + image_only, texts,
                            [True] * len(pairs) + [False] * len(text_only) + [True] * len(image_only),
                            prepared.classes, concepts=torch.from_numpy(numpy.concatenate([concepts, label_concepts])))

    def batch(self, rows: TrainingRows, index: torch.Tensor, config: Any) -> Batch:
        # Decoupled batch: the images of pair and image-only rows against the texts of pair and text-only rows.
        picked = index.tolist()
        with_image = [i for i in picked if rows.has_image[i]]
        with_text = [i for i in picked if rows.texts[i] is not None]
        column = {row: position for position, row in enumerate(with_text)}
        return Batch(list(rows.records.take(with_image)), [rows.texts[i] for i in with_text],
                     {"image_concepts": rows.concepts[with_image], "text_concepts": rows.concepts[with_text],
                      "pair_index": torch.tensor([column.get(i, -1) for i in with_image])})

    def loss(self, config: Any, model: nn.Module) -> nn.Module:
        return SemanticMatchingLoss(config.semantic_temperature)
