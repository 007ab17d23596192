"""Linear probe: logistic regression on frozen image embeddings, on the full train split and k-shot subsets.

Features are L2-normalised (cosine geometry, as CLIP compares them) and then standardised with statistics
of the rows being fitted. The inverse regularisation strength C is chosen by stratified 3-fold
cross-validation on the train split only (accuracy over a small grid; ties go to the smaller C); when a
class has fewer than 3 train rows, and for every k-shot fit, C is the fixed default 1.0: a few examples per
class leave nothing to validate on honestly. The test split is only ever scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from clipmed.errors import ClipmedError
from clipmed.evaluation.metrics import classification_metrics, macro_f1

C_GRID = (0.01, 0.1, 1.0, 10.0)
DEFAULT_C = 1.0
_FOLDS = 3


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    *,
    shots: Sequence[int] = (1, 4, 16),
    draws: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict:
    """Fit the probe on the full train split and on `draws` random k-per-class subsets; score on test.

    Returns `{"full": {"top1", "macro_f1", "ci95": {"top1", "macro_f1"}, "n_train", "C"},
    "k_shot": {"k": {"top1_mean", "top1_std", "macro_f1_mean", "macro_f1_std", "draws"}}}` (std is the
    population std across draws). A k that some train class cannot fill is reported as `{"skipped": reason}`.
    Deterministic per `seed`: subsets for k come from `default_rng([seed, k])`.
    """
    train_x, test_x = _normalise(train_x), _normalise(test_x)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"mismatched shapes: train {train_x.shape}/{train_y.shape}, test {test_x.shape}/{test_y.shape}"
        )
    if train_y.min() < 0 or train_y.max() >= len(classes):
        raise ValueError(f"train_y must be class indices in [0, {len(classes)})")
    present, counts = np.unique(train_y, return_counts=True)
    if len(present) < 2:
        raise ClipmedError("the linear probe needs at least two classes in the train split; prepare a larger split")

    # Single-threaded BLAS: these problems are small, where threads mostly contend (10x slower on 2 cores),
    # and the result no longer depends on the machine's core count.
    with threadpool_limits(limits=1, user_api="blas"):
        c_value = _choose_c(train_x, train_y, seed) if counts.min() >= _FOLDS else DEFAULT_C
        scores = _scores(_fit(train_x, train_y, c_value), test_x, len(classes))
        full = classification_metrics(scores, test_y, classes, n_boot=n_boot, seed=seed)
        k_shot = {
            str(k): _k_shot(train_x, train_y, test_x, test_y, classes, int(k), draws, seed) for k in shots
        }
    return {
        "full": {
            "top1": full["top1"],
            "macro_f1": full["macro_f1"],
            "ci95": {"top1": full["ci95"]["top1"], "macro_f1": full["ci95"]["macro_f1"]},
            "n_train": int(len(train_y)),
            "C": c_value,
        },
        "k_shot": k_shot,
    }


def _k_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    k: int,
    draws: int,
    seed: int,
) -> dict:
    """Mean and std of test top-1 / macro-F1 over `draws` fits on k random train rows per present class."""
    present, counts = np.unique(train_y, return_counts=True)
    if counts.min() < k:
        short = classes[int(present[np.argmin(counts)])]
        return {"skipped": f"class {short!r} has only {counts.min()} train rows, fewer than k={k}"}
    rng = np.random.default_rng([seed, k])
    top1, f1 = [], []
    for _ in range(draws):
        rows = np.concatenate([rng.choice(np.flatnonzero(train_y == c), size=k, replace=False) for c in present])
        predictions = _scores(_fit(train_x[rows], train_y[rows], DEFAULT_C), test_x, len(classes)).argmax(axis=1)
        top1.append(float(np.mean(predictions == test_y)))
        f1.append(macro_f1(test_y, predictions, len(classes)))
    return {
        "top1_mean": float(np.mean(top1)),
        "top1_std": float(np.std(top1)),
        "macro_f1_mean": float(np.mean(f1)),
        "macro_f1_std": float(np.std(f1)),
        "draws": int(draws),
    }


def _choose_c(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The grid C with the best mean cross-validated accuracy on the train split (first best wins)."""
    folds = list(StratifiedKFold(n_splits=_FOLDS, shuffle=True, random_state=seed).split(x, y))
    accuracy = [
        np.mean([np.mean(_fit(x[fit], y[fit], c).predict(x[held]) == y[held]) for fit, held in folds]) for c in C_GRID
    ]
    return float(C_GRID[int(np.argmax(accuracy))])


def _fit(x: np.ndarray, y: np.ndarray, c_value: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c_value, max_iter=1000)).fit(x, y)


def _scores(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """[N, n_classes] class probabilities; classes absent from the fitted rows get -1 so they are never chosen."""
    scores = np.full((len(x), n_classes), -1.0)
    scores[:, model.classes_] = model.predict_proba(x)
    return scores


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
