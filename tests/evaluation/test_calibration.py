"""Calibration: ECE over 15 equal-width bins against a hand computation, and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from clipmed.evaluation.calibration import fit_temperature, probabilities, reliability


def test_ece_equals_a_hand_computation():
    # Two-class logits chosen so the top probabilities are 0.9, 0.9, 0.6, 0.55 (bins 13, 13, 9 and 8 of 15).
    confidences = np.array([0.9, 0.9, 0.6, 0.55])
    logits = np.stack([np.log(confidences), np.log(1 - confidences)], axis=1)
    labels = np.array([0, 1, 0, 0])  # right, wrong, right, right
    out = reliability(logits, labels)
    # Bin (0.8667, 0.9333]: 2 rows, accuracy 0.5, confidence 0.9; bin (0.5333, 0.6]: 0.6 and 0.55, both right.
    hand = 2 / 4 * abs(0.5 - 0.9) + 2 / 4 * abs(1.0 - 0.575)
    assert out["ece"] == pytest.approx(hand)
    assert out["n_bins"] == 15 and len(out["bins"]) == 15
    assert sum(b["n"] for b in out["bins"]) == 4
    assert out["bins"][13]["n"] == 2 and out["bins"][13]["accuracy"] == pytest.approx(0.5)
    assert out["bins"][0]["confidence"] is None


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    # 0.6 is the upper edge of bin 8 ((0.5333, 0.6]).
    logits = np.log(np.array([[0.6, 0.4]]))
    assert reliability(logits, np.array([0]))["bins"][8]["n"] == 1


def test_temperature_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4)) * 1.5
    labels = np.array([rng.choice(4, p=p) for p in probabilities(true_logits)])
    overconfident = 3.0 * true_logits  # the right ranking, three times too sharp
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert reliability(overconfident, labels, temperature=temperature)["ece"] < reliability(overconfident, labels)["ece"]
