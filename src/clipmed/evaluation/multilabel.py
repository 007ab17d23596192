"""Multi-label metrics: per-finding AUROC and average precision (scikit-learn's), their macro means, and
bootstrap intervals. numpy arrays in, JSON-able dicts out, as in `metrics.py`.

A finding whose rows are all positive or all negative has no AUROC (nor a meaningful AP): it is reported as
undefined with the reason, never as 0 or 1, and left out of the macro means. A bootstrap resample in which a
finding that is defined on the full data has no positive (or no negative) row would make that finding
undefined in the resample; such a resample is redrawn, and the number of redraws is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from clipmed.errors import ClipmedError
from clipmed.evaluation.metrics import check_boot, check_finite_matrix, percentile_interval

# Draws allowed per requested resample before giving up (a finding with one positive in a large set is redrawn
# about e times as often as kept; hundreds of times more means the interval would describe almost nothing).
_MAX_DRAWS_PER_RESAMPLE = 100


@dataclass
class MultilabelResult:
    """The JSON (`metrics`) and the bootstrap macro AUROC of each kept resample, for averages over datasets."""

    metrics: dict
    macro_auroc_samples: np.ndarray | None  # [n_boot]; None when no finding is defined


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, findings: Sequence[str], *, n_boot: int = 1000,
                       seed: int = 0) -> MultilabelResult:
    """Score [N, F] finding scores (higher = more likely present) against [N, F] 0/1 targets.

    JSON: `{"n", "findings", "macro_auroc", "map", "ci95": {"macro_auroc", "map"}, "undefined": [names],
    "redrawn_resamples", "per_class": {name: {"n_positive", "auroc", "ap", "ci95": {"auroc", "ap"}}}}`; an
    undefined finding has `"auroc": null, "ap": null, "undefined": reason`; with no defined finding the macro
    values and their intervals are null. Intervals: 95% percentile bootstrap over rows, the same resamples for
    every finding, `numpy.random.default_rng(seed)`.
    """
    scores = check_finite_matrix(scores, "scores")
    targets = np.asarray(targets)
    findings = [str(name) for name in findings]
    if targets.shape != scores.shape or scores.shape[1] != len(findings):
        raise ValueError(f"scores {scores.shape}, targets {targets.shape} and {len(findings)} findings disagree")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0 or 1")
    check_boot(n_boot)
    targets = targets.astype(np.int64)
    n = len(scores)
    positives = targets.sum(axis=0)
    defined = (positives > 0) & (positives < n)
    columns = np.flatnonzero(defined)

    auroc = np.full(len(findings), np.nan)
    ap = np.full(len(findings), np.nan)
    boot_auroc = boot_ap = None
    redrawn = 0
    if len(columns):
        auroc[columns] = roc_auc_score(targets[:, columns], scores[:, columns], average=None)
        ap[columns] = average_precision_score(targets[:, columns], scores[:, columns], average=None)
        resamples, redrawn = _resamples_with_both_classes(targets[:, columns], [findings[j] for j in columns],
                                                          n_boot, seed)
        boot_auroc = np.stack([roc_auc_score(targets[idx][:, columns], scores[idx][:, columns], average=None)
                               for idx in resamples]).reshape(n_boot, len(columns))
        boot_ap = np.stack([average_precision_score(targets[idx][:, columns], scores[idx][:, columns], average=None)
                            for idx in resamples]).reshape(n_boot, len(columns))

    per_class = {}
    for j, name in enumerate(findings):
        entry: dict = {"n_positive": int(positives[j])}
        if defined[j]:
            k = int(np.searchsorted(columns, j))
            entry.update(auroc=float(auroc[j]), ap=float(ap[j]),
                         ci95={"auroc": percentile_interval(boot_auroc[:, k]),
                               "ap": percentile_interval(boot_ap[:, k])})
        else:
            entry.update(auroc=None, ap=None, undefined="no positive rows" if positives[j] == 0 else "no negative rows")
        per_class[name] = entry
    macro_samples = boot_auroc.mean(axis=1) if boot_auroc is not None else None
    metrics = {
        "n": int(n),
        "findings": findings,
        "macro_auroc": float(auroc[columns].mean()) if len(columns) else None,
        "map": float(ap[columns].mean()) if len(columns) else None,
        "ci95": {"macro_auroc": percentile_interval(macro_samples) if macro_samples is not None else None,
                 "map": percentile_interval(boot_ap.mean(axis=1)) if boot_ap is not None else None},
        "undefined": [name for j, name in enumerate(findings) if not defined[j]],
        "redrawn_resamples": int(redrawn),
        "per_class": per_class,
    }
    return MultilabelResult(metrics, macro_samples)


def _resamples_with_both_classes(targets: np.ndarray, names: list[str], n_boot: int,
                                 seed: int) -> tuple[list[np.ndarray], int]:
    """`n_boot` bootstrap row draws in which every column of [N, F] 0/1 targets has a positive and a negative,
    and how many draws were rejected (redrawn) to get them."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    kept: list[np.ndarray] = []
    redrawn = 0
    while len(kept) < n_boot:
        if redrawn > _MAX_DRAWS_PER_RESAMPLE * n_boot:
            rare = names[int(np.argmin(np.minimum(targets.sum(axis=0), n - targets.sum(axis=0))))]
            raise ClipmedError(f"bootstrap intervals impossible: finding {rare!r} has too few positive or negative "
                               f"rows among {n} for resamples to hold both; leave it out of the dataset's classes")
        idx = rng.integers(0, n, size=n)
        positives = targets[idx].sum(axis=0)
        if ((positives > 0) & (positives < n)).all():
            kept.append(idx)
        else:
            redrawn += 1
    return kept, redrawn
