"""Linear probe: separable data, random labels, exact k-shot subsets, determinism and speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import clipmed.evaluation.probe as probe
from clipmed.errors import ClipmedError
from clipmed.evaluation.probe import linear_probe

CLASSES = ["w", "x", "y", "z"]


def _blobs(n: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    centres = 10 * np.eye(len(CLASSES), dim)
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


def test_separable_data_is_classified_perfectly():
    train_x, train_y = _blobs(80, 16, 0.5, seed=0)
    test_x, test_y = _blobs(40, 16, 0.5, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, CLASSES, shots=(1, 4), draws=3, n_boot=100)
    full = result["full"]
    assert full["top1"] == full["macro_f1"] == 1.0
    assert full["ci95"] == {"top1": [1.0, 1.0], "macro_f1": [1.0, 1.0]}
    assert full["n_train"] == 80 and full["C"] in probe.C_GRID
    assert result["k_shot"]["4"] == {"top1_mean": 1.0, "top1_std": 0.0, "macro_f1_mean": 1.0, "macro_f1_std": 0.0,
                                     "draws": 3}


def test_random_labels_stay_near_chance():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    result = linear_probe(train_x, train_y, test_x, test_y, CLASSES, shots=(4,), draws=3, n_boot=100)
    assert abs(result["full"]["top1"] - 0.25) < 0.08
    assert abs(result["k_shot"]["4"]["top1_mean"] - 0.25) < 0.1


def test_k_shot_fits_exactly_k_rows_per_class(monkeypatch):
    fitted_labels = []
    original = probe._fit

    def recording_fit(x, y, c_value):
        fitted_labels.append(np.bincount(y, minlength=len(CLASSES)).tolist())
        return original(x, y, c_value)

    monkeypatch.setattr(probe, "_fit", recording_fit)
    train_x, train_y = _blobs(60, 8, 1.0, seed=0)
    test_x, test_y = _blobs(20, 8, 1.0, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, CLASSES, shots=(1, 4, 16), draws=2, n_boot=10)
    # The last fits are the k-shot ones, in order of `shots`; 16 > 15 train rows per class is skipped.
    assert fitted_labels[-4:] == [[1] * 4, [1] * 4, [4] * 4, [4] * 4]
    assert "15 train rows" in result["k_shot"]["16"]["skipped"]


def test_probe_is_deterministic_and_seed_dependent():
    train_x, train_y = _blobs(80, 8, 6.0, seed=0)
    test_x, test_y = _blobs(40, 8, 6.0, seed=1)

    def run(seed: int) -> str:
        result = linear_probe(train_x, train_y, test_x, test_y, CLASSES, shots=(1,), seed=seed, n_boot=50)
        return json.dumps(result, allow_nan=False)

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_single_class_train_split_is_a_user_error():
    x = np.ones((4, 3))
    with pytest.raises(ClipmedError, match="two classes"):
        linear_probe(x, np.zeros(4, dtype=int), x, np.zeros(4, dtype=int), CLASSES)
