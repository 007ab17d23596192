"""The gallery data behind report.html: a pure function of embeddings, records and class scores."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipmed.data.records import Record
from clipmed.data.sources import load_source
from clipmed.report.gallery import build_gallery


@pytest.fixture(scope="module")
def records(synthetic_dataset) -> list[Record]:
    return load_source(str(synthetic_dataset)).records[:30]  # 24 labeled rows, then 6 without a label


def _inputs(records: list[Record], seed: int = 0):
    classes = ["Abdomen", "Chest", "Head"]
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(len(records), 8))
    scores = rng.uniform(-1, 1, size=(len(records), len(classes)))
    return images, scores, classes


def test_a_caption_finds_its_own_image_first_when_the_embeddings_agree(records):
    images, scores, classes = _inputs(records)
    gallery = build_gallery(images, 2 * images, records, scores, classes, n_queries=3, k=4, model="caption")
    assert gallery["model"] == "caption" and gallery["k"] == 4
    assert len(gallery["text_to_image"]) == 3
    for query in gallery["text_to_image"]:
        results = query["results"]
        assert len(results) == 4 and query["paired_rank"] == 1
        assert results[0]["id"] == query["id"] and results[0]["correct"] and results[0]["score"] == pytest.approx(1)
        assert [r["correct"] for r in results[1:]] == [False] * 3
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        by_id = {r.id: r for r in records}
        assert query["caption"] == by_id[query["id"]].caption
        for item in results:
            assert item["same_label"] == (query["label"] is not None and item["label"] == query["label"])
            assert (item["source"], item["license"]) == (by_id[item["id"]].extra["source"], "CC BY")
    json.dumps(gallery)  # plain JSON data throughout


def test_image_queries_give_the_top3_classes_with_clip_probabilities(records):
    images, scores, classes = _inputs(records)
    gallery = build_gallery(images, images, records, scores, classes, n_queries=5, logit_scale=50.0)
    assert len(gallery["image_to_label"]) == 5
    index = {r.id: i for i, r in enumerate(records)}
    for query in gallery["image_to_label"]:
        row = scores[index[query["id"]]]
        expected = np.exp(50 * row) / np.exp(50 * row).sum()
        predictions = query["predictions"]
        assert [p["label"] for p in predictions] == [classes[c] for c in np.argsort(-row)[:3]]
        assert [p["probability"] for p in predictions] == pytest.approx(sorted(expected, reverse=True))
        assert [p["correct"] for p in predictions] == [p["label"] == query["label"] for p in predictions]
        assert query["label"] in classes  # only labeled rows are image queries


def test_thumbnails_are_small_jpegs(records):
    images, scores, classes = _inputs(records)
    gallery = build_gallery(images, images, records, scores, classes, thumbnail_px=32)
    for item in gallery["image_to_label"] + gallery["text_to_image"][0]["results"]:
        thumbnail = Image.open(io.BytesIO(base64.b64decode(item["thumbnail"])))
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 32


def test_the_same_seed_draws_the_same_queries(records):
    images, scores, classes = _inputs(records)
    def ids(gallery: dict) -> list[str]:
        return [q["id"] for q in gallery["text_to_image"] + gallery["image_to_label"]]

    first = build_gallery(images, images, records, scores, classes, seed=3)
    assert first == build_gallery(images, images, records, scores, classes, seed=3)
    assert ids(first) != ids(build_gallery(images, images, records, scores, classes, seed=4))


def test_an_unreadable_image_has_no_thumbnail_but_keeps_its_attribution(records, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    one = [Record("x", str(broken), "a chest film", "Chest", extra={"source": "PMC1", "license": "CC0"})]
    gallery = build_gallery(np.ones((1, 4)), np.ones((1, 4)), one, np.zeros((1, 3)), ["Abdomen", "Chest", "Head"])
    item = gallery["text_to_image"][0]["results"][0]
    assert item["thumbnail"] is None and (item["source"], item["license"]) == ("PMC1", "CC0")


def test_mismatched_shapes_are_an_error(records):
    images, scores, classes = _inputs(records)
    with pytest.raises(ValueError, match="shapes disagree"):
        build_gallery(images, images[:-1], records, scores, classes)
    with pytest.raises(ValueError, match="shapes disagree"):
        build_gallery(images, images, records, scores[:, :2], classes)
