"""Figures: each writes one valid PNG and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from clipmed.evaluation.metrics import classification_metrics
from clipmed.report.figures import data_efficiency_figure, embedding_figure, per_class_figure

CLASSES = ["Abdomen", "Chest", "Head"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def _model(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    return classification_metrics(rng.normal(size=(9, 3)), labels, CLASSES, n_boot=20)


def test_per_class_figure(tmp_path):
    path = tmp_path / "per_class.png"
    per_class_figure({"base": _model(0), "caption": _model(1), "label": _model(2)}, path)
    _assert_png(path)


def test_per_class_figure_rejects_models_on_different_classes(tmp_path):
    other = _model(1)
    other["classes"] = ["Abdomen", "Chest", "Knee"]
    with pytest.raises(ValueError, match="different classes"):
        per_class_figure({"base": _model(0), "other": other}, tmp_path / "x.png")


def test_embedding_figure(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    embeddings = {name: rng.normal(size=(30, 8)) + 3 * np.eye(3, 8)[labels] for name in ("base", "label")}
    path = tmp_path / "embeddings.png"
    embedding_figure(embeddings, labels, CLASSES, path)
    _assert_png(path)


def test_data_efficiency_figure(tmp_path):
    path = tmp_path / "data_efficiency.png"
    data_efficiency_figure({"caption": [(1000, 0.5, 0.45, 0.55), (100, 0.3, 0.2, 0.4)],
                            "label": [(100, 0.35, 0.3, 0.4), (1000, 0.6, 0.55, 0.65)]}, path)
    _assert_png(path)


def test_embedding_figure_survives_identical_embeddings(tmp_path):
    """A collapsed model gives identical points: the figure must still be drawn (sklearn's PCA init would
    hand NaNs to Barnes-Hut t-SNE, which segfaults)."""
    from clipmed.report.figures import embedding_figure

    path = tmp_path / "e.png"
    embedding_figure({"collapsed": np.ones((30, 8), dtype=np.float32)}, np.arange(30) % 3, ["a", "b", "c"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
