"""The retrieval gallery of report.html, as plain data: what a model retrieves for a few test queries.

Text -> image: for a few test captions, the k test images closest to each caption (the caption's own image is
`correct`). Image -> label: for a few test images, the top-3 zero-shot classes with their probabilities.
Every image comes as a small JPEG thumbnail (base64) with its attribution (`source`, `license` of the record),
which CC BY requires wherever the image is shown. A pure function of its inputs: no model, no files written.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

from clipmed.data.images import ImageError, open_rgb
from clipmed.data.records import Record

TOP_LABELS = 3


def build_gallery(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    records: Sequence[Record],
    class_scores: np.ndarray,
    classes: Sequence[str],
    *,
    n_queries: int = 4,
    k: int = 5,
    seed: int = 0,
    logit_scale: float = 100.0,
    model: str | None = None,
    thumbnail_px: int = 128,
) -> dict:
    """The gallery dict report.html renders (JSON-able).

    image_embeddings and text_embeddings are [N, D] with row i the image and the caption of `records[i]`
    (normalised here; a row whose record has no caption is never a query). class_scores is [N, C] cosine
    similarity of each image to each class, as `zero_shot_scores`; probabilities are
    softmax(logit_scale * score), CLIP's zero-shot probabilities: pass the model's `scale()`. `model` names
    the model in the report. Queries are drawn with `numpy.random.default_rng(seed)`; ties rank by index.
    """
    images = _normalised(image_embeddings, "image_embeddings")
    texts = _normalised(text_embeddings, "text_embeddings")
    scores = np.asarray(class_scores, dtype=np.float64)
    n = len(records)
    if images.shape[0] != n or texts.shape != images.shape or scores.shape != (n, len(classes)):
        raise ValueError(f"shapes disagree: {n} records, image embeddings {images.shape}, text embeddings "
                         f"{texts.shape}, class scores {scores.shape} for {len(classes)} classes")
    rng = np.random.default_rng(seed)
    thumbnails = _Thumbnails(records, thumbnail_px)

    captioned = [i for i, r in enumerate(records) if r.caption]
    text_queries = []
    for q in _draw(rng, captioned, n_queries):
        similarity = images @ texts[q]
        order = np.argsort(-similarity, kind="stable")
        text_queries.append({
            "id": records[q].id,
            "caption": records[q].caption,
            "label": records[q].label,
            "paired_rank": int(np.flatnonzero(order == q)[0]) + 1,
            "results": [{**thumbnails.item(i), "score": float(similarity[i]), "correct": bool(i == q),
                         "same_label": records[q].label is not None and records[i].label == records[q].label}
                        for i in order[:k]],
        })

    labeled = [i for i, r in enumerate(records) if r.label in classes]
    image_queries = []
    for q in _draw(rng, labeled, n_queries):
        logits = logit_scale * scores[q]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        top = np.argsort(-scores[q], kind="stable")[:TOP_LABELS]
        image_queries.append({
            **thumbnails.item(q),
            "predictions": [{"label": classes[c], "probability": float(probabilities[c]),
                             "correct": classes[c] == records[q].label} for c in top],
        })
    return {"model": model, "k": k, "text_to_image": text_queries, "image_to_label": image_queries}


def _normalised(embeddings: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(embeddings, dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"{name} must be a finite [N, D] matrix, got shape {values.shape}")
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)


def _draw(rng: np.random.Generator, candidates: list[int], n: int) -> list[int]:
    """Up to n distinct candidates, in index order (stable for a given seed)."""
    if not candidates:
        return []
    return sorted(int(i) for i in rng.choice(candidates, size=min(n, len(candidates)), replace=False))


class _Thumbnails:
    """Each record's image decoded and encoded at most once, however often it is shown."""

    def __init__(self, records: Sequence[Record], px: int) -> None:
        self.records, self.px, self.cache = records, px, {}

    def item(self, index: int) -> dict:
        """The fields every shown image carries: id, label, thumbnail (base64 JPEG or None) and attribution."""
        record = self.records[index]
        if index not in self.cache:
            self.cache[index] = _thumbnail(record.image_path, self.px)
        return {"id": record.id, "label": record.label, "thumbnail": self.cache[index],
                "source": record.extra.get("source"), "license": record.extra.get("license")}


def _thumbnail(path: str | None, px: int) -> str | None:
    """A base64 JPEG at most px x px, or None when the image cannot be read (the report says so)."""
    if path is None:
        return None
    try:
        image = open_rgb(path)
    except ImageError:
        return None
    image.thumbnail((px, px))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
