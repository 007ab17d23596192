"""Multi-label metrics: scikit-learn's AUROC and AP per finding, undefined findings marked, and bootstrap
resamples that lose a finding's positives or negatives redrawn and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from clipmed.evaluation.multilabel import multilabel_metrics

# Three findings on six rows; the third has no positive row at all.
TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
SCORES = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.5], [0.4, 0.7, 0.2], [0.5, 0.1, 0.9], [0.8, 0.6, 0.3],
                   [0.1, 0.3, 0.4]])


def test_auroc_and_ap_equal_scikit_learn_and_undefined_is_marked():
    result = multilabel_metrics(SCORES, TARGETS, ["effusion", "fracture", "cyst"], n_boot=50, seed=0).metrics
    for j, name in enumerate(["effusion", "fracture"]):
        assert result["per_class"][name]["auroc"] == pytest.approx(roc_auc_score(TARGETS[:, j], SCORES[:, j]))
        assert result["per_class"][name]["ap"] == pytest.approx(average_precision_score(TARGETS[:, j], SCORES[:, j]))
        low, high = result["per_class"][name]["ci95"]["auroc"]
        assert 0.0 <= low <= high <= 1.0
    # By hand: effusion's positives (0.9, 0.4, 0.8) beat 8 of the 9 positive/negative pairs (0.4 loses to 0.5).
    assert result["per_class"]["effusion"]["auroc"] == pytest.approx(8 / 9)
    cyst = result["per_class"]["cyst"]
    assert cyst["auroc"] is None and cyst["ap"] is None and cyst["undefined"] == "no positive rows"
    assert result["undefined"] == ["cyst"]
    # Macro means over the defined findings only.
    assert result["macro_auroc"] == pytest.approx(np.mean([roc_auc_score(TARGETS[:, j], SCORES[:, j]) for j in (0, 1)]))
    assert result["map"] == pytest.approx(np.mean([average_precision_score(TARGETS[:, j], SCORES[:, j])
                                                   for j in (0, 1)]))
    json.dumps(result)  # JSON-able: None, not NaN


def test_all_positive_finding_is_undefined_too():
    targets = np.array([[1, 1], [1, 0], [1, 1]])
    result = multilabel_metrics(np.random.default_rng(0).random((3, 2)), targets, ["a", "b"], n_boot=20).metrics
    assert result["per_class"]["a"]["undefined"] == "no negative rows"
    assert result["undefined"] == ["a"] and result["per_class"]["b"]["auroc"] is not None


def test_resamples_without_a_positive_are_redrawn_and_counted():
    # One positive among 20 rows: about (19/20)^20 = 36% of plain resamples hold no positive and are redrawn.
    targets = np.zeros((20, 1), dtype=int)
    targets[3] = 1
    scores = np.linspace(0, 1, 20)[:, None]
    out = multilabel_metrics(scores, targets, ["rare"], n_boot=60, seed=1)
    assert 10 < out.metrics["redrawn_resamples"] < 80  # about 60 x 0.36 / 0.64 = 34 expected
    assert out.macro_auroc_samples.shape == (60,) and np.isfinite(out.macro_auroc_samples).all()
    # The same draws again: deterministic per seed.
    assert multilabel_metrics(scores, targets, ["rare"], n_boot=60, seed=1).metrics == out.metrics


def test_no_defined_finding_gives_null_macro():
    out = multilabel_metrics(np.ones((4, 1)), np.zeros((4, 1), dtype=int), ["a"], n_boot=10)
    assert out.metrics["macro_auroc"] is None and out.metrics["ci95"]["macro_auroc"] is None
    assert out.macro_auroc_samples is None
