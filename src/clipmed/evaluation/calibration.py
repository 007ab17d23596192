"""Calibration of zero-shot probabilities: expected calibration error, reliability bins, temperature scaling.

Probabilities are softmax(logits / T) over each row's logits (zero-shot: the model's logit scale times the
cosine to each class prompt; a multi-label finding is a two-column row, positive and negative prompt).
Confidence is a row's largest probability and "correct" whether that column is the true one (Guo et al.,
2017). ECE uses equal-width confidence bins (lo, hi], the first bin [0, hi]: sum over bins of
(rows in bin / rows) * |accuracy - mean confidence|. The temperature is fitted by minimising the negative
log-likelihood, on a validation split only: fitting on test would grade the model on its own answers.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

N_BINS = 15
# Temperatures searched (log-uniform bounds): far beyond any useful value on both sides.
TEMPERATURE_RANGE = (1e-2, 1e2)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) along the last axis."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1))


def reliability(logits: np.ndarray, labels: np.ndarray, *, temperature: float = 1.0, n_bins: int = N_BINS) -> dict:
    """`{"ece", "n_bins", "bins": [{"lo", "hi", "n", "confidence", "accuracy"}]}` of [M, K] logits against
    [M] true column indices (empty bins have null confidence and accuracy)."""
    probs = probabilities(logits, temperature)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        rows = which == b
        count = int(rows.sum())
        conf = float(confidence[rows].mean()) if count else None
        acc = float(correct[rows].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(acc - conf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": count, "confidence": conf,
                     "accuracy": acc})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the mean negative log-likelihood of softmax(logits / T) on these rows."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(logits))
    labels = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    found = minimize_scalar(nll, bounds=np.log(TEMPERATURE_RANGE), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))
