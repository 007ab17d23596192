"""Classification and retrieval metrics: numpy arrays in, JSON-able dicts out (plain floats and ints).

Conventions shared by every function here:
- Ties: items with equal scores rank by ascending index (a stable sort of descending scores). The top-1
  prediction is therefore `argmax` (the first maximum), and every number is deterministic.
- Intervals: 95% percentile bootstrap over rows (samples, queries) drawn with `numpy.random.default_rng(seed)`,
  so identical input gives identical output, byte for byte after `json.dumps`.
- Scale: memory is bounded independently of N x N. Retrieval computes similarities a block of query rows at a
  time from the embeddings; bootstrap means come from per-resample row counts (bincount) times the per-row
  values, a block of resamples at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from clipmed.errors import ClipmedError

# Bootstrap indices held in memory at once (resamples x rows); bounds memory for large test sets.
_BLOCK_ELEMENTS = 1 << 20
# Similarities held in memory at once (query rows x candidates) in retrieval.
_SIMILARITY_BLOCK_ELEMENTS = 1 << 22


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Score a [N, C] matrix (higher = more likely) against true class indices [N].

    Returns the evaluate JSON the report reads:
    `{"n", "classes", "top1", "top3", "macro_f1", "balanced_accuracy", "majority_rate",
      "ci95": {"top1": [lo, hi], "top3": [lo, hi], "macro_f1": [lo, hi], "balanced_accuracy": [lo, hi]},
      "per_class": {name: {"n", "top1"}}, "confusion": {"classes", "matrix"}}`.
    top-k counts the true class among the k highest scores (C < 3 makes top3 1.0). macro_f1 averages over
    classes present in the labels or the predictions (sklearn's `average="macro", zero_division=0`).
    balanced_accuracy averages recall over classes present in the labels. majority_rate is the accuracy of
    always guessing the most frequent true class. per_class top1 is null for classes with no test rows.
    Confusion rows are true classes, columns predicted. Intervals resample the rows (n_boot >= 1).
    """
    scores, labels, classes = _check_classification(scores, labels, classes)
    check_boot(n_boot)
    n, n_classes = scores.shape
    ranks = _ranks(scores, labels)
    hit1 = (ranks < 1).astype(np.float64)
    hit3 = (ranks < 3).astype(np.float64)
    codes = labels * n_classes + np.argmax(scores, axis=1)
    confusion = _confusions(codes[None, :], n_classes)[0]
    support = confusion.sum(axis=1)
    correct = np.diagonal(confusion)

    hits = np.stack([hit1, hit3], axis=1)
    boot: dict[str, list[np.ndarray]] = {"top1": [], "top3": [], "macro_f1": [], "balanced_accuracy": []}
    for idx in bootstrap_resamples(n, n_boot, seed):
        confusions = _confusions(codes[idx], n_classes)
        top1, top3 = (_counts(idx, n) @ hits / n).T
        boot["top1"].append(top1)
        boot["top3"].append(top3)
        boot["macro_f1"].append(_macro_f1(confusions))
        boot["balanced_accuracy"].append(_balanced_accuracy(confusions))

    return {
        "n": int(n),
        "classes": classes,
        "top1": float(hit1.mean()),
        "top3": float(hit3.mean()),
        "macro_f1": float(_macro_f1(confusion)),
        "balanced_accuracy": float(_balanced_accuracy(confusion)),
        "majority_rate": float(support.max() / n),
        "ci95": {name: percentile_interval(np.concatenate(parts)) for name, parts in boot.items()},
        "per_class": {
            name: {"n": int(support[c]), "top1": float(correct[c] / support[c]) if support[c] else None}
            for c, name in enumerate(classes)
        },
        "confusion": {"classes": classes, "matrix": confusion.tolist()},
    }


def macro_f1(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> float:
    """Macro F1 of predicted class indices, with the same convention as `classification_metrics`."""
    codes = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(predictions, dtype=np.int64)
    return float(_macro_f1(_confusions(codes[None, :], n_classes)[0]))


def retrieval_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    image_labels: np.ndarray | None = None,
    text_labels: np.ndarray | None = None,
    pairs: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 5, 10),
    n_boot: int = 1000,
    seed: int = 0,
    block_rows: int | None = None,
) -> dict:
    """Image->text and text->image retrieval, similarity = `image_embeddings @ text_embeddings.T`.

    The [N_img, N_txt] similarity is never formed whole: each direction computes `block_rows` query rows at a
    time (default: as many as fit `_SIMILARITY_BLOCK_ELEMENTS`), so a 100k-row split needs megabytes, not
    tens of gigabytes. Products are in float32 unless an input is float64. Pass normalised embeddings for cosine similarity; a precomputed similarity matrix S is
    `(S, numpy.eye(N_txt))`. `pairs[i]` is the index of the text paired with image i (default: identity, which
    needs as many texts as images). Recall@K: the paired item is among the top K (a text paired with several
    images counts its best one; texts paired with no image are not recall queries). Precision@K (MedCLIP's
    table): share of the top K retrieved items whose label equals the query's; needs both `image_labels` and
    `text_labels`, integer class indices with -1 for "no label" (unlabelled queries are skipped, unlabelled
    candidates never match); K is capped at the number of candidates. `mean_recall_at_1` averages R@1 over both
    directions (checkpoint selection). Returns `{"n_images", "n_texts", "ks", "mean_recall_at_1",
    "image_to_text": {...}, "text_to_image": {...}}`, each direction `{"n_queries", "recall_at": {"1": x, ...},
    "ci95": {"recall@1": [lo, hi], ...}}` plus, with labels, `"n_labelled_queries"`, `"precision_at"` and
    `"precision@K"` intervals.
    """
    # float32 embeddings stay float32 (half the memory and time of the block products); float64 stays float64.
    dtype = np.result_type(np.asarray(image_embeddings).dtype, np.asarray(text_embeddings).dtype, np.float32)
    images = check_finite_matrix(image_embeddings, "image embeddings", dtype)
    texts = check_finite_matrix(text_embeddings, "text embeddings", dtype)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image embeddings have {images.shape[1]} dimensions but text embeddings {texts.shape[1]}")
    check_boot(n_boot)
    if block_rows is not None and int(block_rows) < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    n_img, n_txt = len(images), len(texts)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if pairs is None:
        if n_img != n_txt:
            raise ValueError(f"{n_img} images and {n_txt} texts need `pairs` (text index per image)")
        pairs = np.arange(n_img)
    pairs = _check_indices(pairs, n_img, n_txt, "pairs")
    if (image_labels is None) != (text_labels is None):
        raise ValueError("give both image_labels and text_labels (or neither) for precision@K")
    if image_labels is not None:
        image_labels = _check_indices(image_labels, n_img, None, "image_labels")
        text_labels = _check_indices(text_labels, n_txt, None, "text_labels")

    # The (query, candidate) pairs of each direction, sorted by query.
    by_text = np.argsort(pairs, kind="stable")
    common = dict(ks=ks, n_boot=n_boot, seed=seed, block_rows=block_rows)
    i2t, i2t_hit1 = _direction(images, texts, (np.arange(n_img), pairs), image_labels, text_labels, **common)
    t2i, t2i_hit1 = _direction(texts, images, (pairs[by_text], by_text), text_labels, image_labels, **common)
    return {
        "n_images": int(n_img),
        "n_texts": int(n_txt),
        "ks": ks,
        "mean_recall_at_1": float((i2t_hit1 + t2i_hit1) / 2),
        "image_to_text": i2t,
        "text_to_image": t2i,
    }


def _direction(
    queries: np.ndarray,
    candidates: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    query_labels: np.ndarray | None,
    candidate_labels: np.ndarray | None,
    *,
    ks: list[int],
    n_boot: int,
    seed: int,
    block_rows: int | None,
) -> tuple[dict, float]:
    """Recall@K (and precision@K with labels) of `queries` against `candidates`, a block of query rows at a time.

    `pairs` = (query indices sorted ascending, their paired candidates): a query's recall rank is that of its
    best-ranked paired candidate; queries with none are not recall queries. Returns the direction's dict and
    its unrounded R@1.
    """
    pair_queries, pair_candidates = pairs
    n_query, n_cand = len(queries), len(candidates)
    rows_per_block = int(block_rows or max(1, _SIMILARITY_BLOCK_ELEMENTS // n_cand))
    depth = min(max(ks), n_cand)
    shown = [min(k, n_cand) for k in ks]
    ranks, precision = [], []
    for start in range(0, n_query, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, n_query))
        sim = queries[rows] @ candidates.T
        low, high = np.searchsorted(pair_queries, [rows[0], rows[-1] + 1])
        query, candidate = pair_queries[low:high] - rows[0], pair_candidates[low:high]
        # Per query, the paired candidate ranked first: highest score, then lowest index.
        order = np.lexsort((candidate, -sim[query, candidate], query))
        first = order[np.r_[True, query[order][1:] != query[order][:-1]]] if len(order) else order
        ranks.append(_ranks(sim[query[first]], candidate[first]))
        if query_labels is not None:
            labelled = query_labels[rows] >= 0
            top = _top_indices(sim[labelled], depth)
            hits = np.cumsum(candidate_labels[top] == query_labels[rows][labelled, None], axis=1)
            precision.append(np.stack([hits[:, k - 1] / k for k in shown], axis=1))
    ranks = np.concatenate(ranks)
    recall = np.stack([(ranks < k).astype(np.float64) for k in ks], axis=1)
    out: dict = {
        "n_queries": int(len(ranks)),
        "recall_at": {str(k): float(v) for k, v in zip(ks, recall.mean(axis=0))},
        "ci95": {f"recall@{k}": ci for k, ci in zip(ks, bootstrap_mean_intervals(recall, n_boot, seed))},
    }
    hit1 = float((ranks < 1).mean())
    if query_labels is None:
        return out, hit1
    precision = np.concatenate(precision)
    out["n_labelled_queries"] = int(len(precision))
    if not len(precision):
        return out, hit1
    out["precision_at"] = {str(k): float(v) for k, v in zip(ks, precision.mean(axis=0))}
    out["ci95"].update(
        {f"precision@{k}": ci for k, ci in zip(ks, bootstrap_mean_intervals(precision, n_boot, seed))}
    )
    return out, hit1


def _top_indices(scores: np.ndarray, depth: int) -> np.ndarray:
    """[rows, depth] column indices of each row's `depth` highest scores in rank order (ties: lower index
    first, as a stable sort of descending scores), by partition: linear in the row length, not N log N."""
    n_rows, n_cols = scores.shape
    if depth >= n_cols:
        return np.argsort(-scores, axis=1, kind="stable")
    chosen = np.argpartition(scores, n_cols - depth, axis=1)[:, n_cols - depth :]
    kth = np.take_along_axis(scores, chosen, axis=1).min(axis=1, keepdims=True)  # the depth-th highest score
    # The partition picks arbitrarily among ties at the depth-th score; where it left some out, take the
    # lowest-index ones instead: everything above that score, then ties in column order until `depth`.
    left_out = (scores == kth).sum(axis=1) > (np.take_along_axis(scores, chosen, axis=1) == kth).sum(axis=1)
    for row in np.flatnonzero(left_out):
        above = np.flatnonzero(scores[row] > kth[row])
        tied = np.flatnonzero(scores[row] == kth[row])[: depth - len(above)]
        chosen[row] = np.concatenate([above, tied])
    values = np.take_along_axis(scores, chosen, axis=1)
    order = np.lexsort((chosen, -values), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def _ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of scores[i, target[i]] within row i (descending; ties rank the lower index first)."""
    rows = np.arange(scores.shape[0])
    own = scores[rows, target][:, None]
    before = np.arange(scores.shape[1])[None, :] < target[:, None]
    return (scores > own).sum(axis=1) + ((scores == own) & before).sum(axis=1)


def _confusions(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """[B, C, C] confusion matrices from [B, N] codes `true * C + predicted`, one bincount for the batch."""
    cells = n_classes * n_classes
    offsets = np.arange(codes.shape[0])[:, None] * cells
    counts = np.bincount((codes + offsets).ravel(), minlength=codes.shape[0] * cells)
    return counts.reshape(codes.shape[0], n_classes, n_classes)


def _macro_f1(confusion: np.ndarray) -> np.ndarray:
    """Macro F1 of [..., C, C] confusion matrices: F1 = 2TP / (2TP + FP + FN) over classes in labels or predictions."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    denominator = confusion.sum(axis=-1) + confusion.sum(axis=-2)
    present = denominator > 0
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(denominator.shape), where=present)
    return f1.sum(axis=-1) / present.sum(axis=-1)


def _balanced_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Mean recall of [..., C, C] confusion matrices over the classes present in the labels (rows with support)."""
    support = confusion.sum(axis=-1)
    recall = np.divide(np.diagonal(confusion, axis1=-2, axis2=-1), support, out=np.zeros(support.shape),
                       where=support > 0)
    return recall.sum(axis=-1) / (support > 0).sum(axis=-1)


def bootstrap_resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap row indices in [block, n] batches; the same (n, n_boot, seed) always yields the same draws."""
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, block):
        yield rng.integers(0, n, size=(min(block, n_boot - start), n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """[block, n] float counts of each row in each resample of a [block, n] index batch (one bincount)."""
    offsets = np.arange(idx.shape[0])[:, None] * n
    return np.bincount((idx + offsets).ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(np.float64)


def bootstrap_mean_intervals(values: np.ndarray, n_boot: int, seed: int) -> list[list[float]]:
    """Percentile interval of the column means of [n, m] values, the same resamples for every column.

    A resample's means are its row counts times the values (one matrix product per block of resamples), so
    the cost is O(n_boot * n) for any number of columns and memory stays at one block."""
    n = len(values)
    values = np.asarray(values, dtype=np.float64)
    stats = np.concatenate([_counts(idx, n) @ values / n for idx in bootstrap_resamples(n, n_boot, seed)])
    return [percentile_interval(stats[:, j]) for j in range(stats.shape[1])]


def percentile_interval(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def check_boot(n_boot: int) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def check_finite_matrix(matrix: np.ndarray, name: str, dtype: np.dtype = np.float64) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=dtype)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ClipmedError(
            f"{name} contains NaN or infinite values: the model produced non-finite embeddings "
            "(diverged training or a broken checkpoint); retrain with a lower learning rate or check the weights"
        )
    return matrix


def _check_indices(values: np.ndarray, length: int, upper: int | None, name: str) -> np.ndarray:
    """Integer array of `length`, each in [0, upper) (or >= -1 when `upper` is None, -1 meaning "no label")."""
    values = np.asarray(values)
    if values.shape != (length,) or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"{name} must be {length} integers, got shape {values.shape} dtype {values.dtype}")
    values = values.astype(np.int64)
    low = 0 if upper is not None else -1
    if values.size and (values.min() < low or (upper is not None and values.max() >= upper)):
        raise ValueError(f"{name} has values outside [{low}, {upper if upper is not None else 'inf'})")
    return values


def _check_classification(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if len(np.asarray(labels)) == 0:
        raise ClipmedError("no test rows to evaluate: the test split is empty; re-run prepare with a larger test share")
    scores = check_finite_matrix(scores, "scores")
    classes = [str(name) for name in classes]
    if scores.shape[1] != len(classes):
        raise ValueError(f"scores have {scores.shape[1]} columns but there are {len(classes)} classes")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    return scores, _check_indices(labels, scores.shape[0], len(classes), "labels"), classes
