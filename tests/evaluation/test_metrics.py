"""Metrics against hand computations on tiny arrays, plus bootstrap determinism and coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from clipmed.errors import ClipmedError
from clipmed.evaluation.metrics import bootstrap_mean_intervals, _top_indices, classification_metrics, macro_f1, retrieval_metrics

CLASSES = ["a", "b", "c", "d"]
# 5 rows x 4 classes; class "d" never occurs in the labels but is predicted once (row 1).
SCORES = np.array([
    [0.7, 0.1, 0.1, 0.1],  # true a, predicted a                   (rank of true class 0)
    [0.1, 0.2, 0.3, 0.4],  # true a, predicted d                   (rank 3: misses top-3)
    [0.2, 0.5, 0.1, 0.2],  # true b, predicted b                   (rank 0)
    [0.1, 0.6, 0.2, 0.1],  # true c, predicted b                   (rank 1)
    [0.3, 0.1, 0.3, 0.3],  # true c, tie a=c=d: predicted a (first)  (rank 1: a ranks ahead of c)
])
LABELS = np.array([0, 0, 1, 2, 2])


def test_classification_metrics_match_hand_computation():
    m = classification_metrics(SCORES, LABELS, CLASSES, n_boot=200)
    assert m["n"] == 5 and m["classes"] == CLASSES
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top3"] == pytest.approx(4 / 5)
    assert m["confusion"] == {"classes": CLASSES, "matrix": [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]}
    # F1 = 2TP / (2TP + FP + FN): a 2/4, b 2/3, c 0, d 0 (predicted, never true), averaged over the 4 present classes.
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 4)
    # Recall a 1/2, b 1/1, c 0/2 over the 3 classes in the labels.
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["majority_rate"] == pytest.approx(2 / 5)
    assert m["per_class"] == {
        "a": {"n": 2, "top1": 0.5}, "b": {"n": 1, "top1": 1.0}, "c": {"n": 2, "top1": 0.0}, "d": {"n": 0, "top1": None},
    }
    assert set(m["ci95"]) == {"top1", "top3", "macro_f1", "balanced_accuracy"}


def test_classification_metrics_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, 400)
    scores = rng.normal(size=(400, 6))
    scores[np.arange(400), labels] += 1.0
    predictions = scores.argmax(axis=1)
    m = classification_metrics(scores, labels, [str(i) for i in range(6)], n_boot=10)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert macro_f1(labels, predictions, 6) == pytest.approx(m["macro_f1"])


def test_fewer_than_three_classes_give_top3_of_one():
    m = classification_metrics(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([0, 0]), ["x", "y"], n_boot=50)
    assert m["top1"] == 0.5 and m["top3"] == 1.0 and m["ci95"]["top3"] == [1.0, 1.0]


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    scores = rng.normal(size=(300, 5))
    scores[np.arange(300), labels] += 1.5
    classes = list("vwxyz")
    first = classification_metrics(scores, labels, classes, seed=7)
    again = classification_metrics(scores, labels, classes, seed=7)
    assert json.dumps(first, allow_nan=False) == json.dumps(again, allow_nan=False)
    assert first["ci95"] != classification_metrics(scores, labels, classes, seed=8)["ci95"]
    for name in ("top1", "top3", "macro_f1"):
        low, high = first["ci95"][name]
        assert low < first[name] < high


def test_vectorised_macro_f1_bootstrap_equals_a_plain_loop():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 60)
    scores = rng.normal(size=(60, 4))
    predictions = scores.argmax(axis=1)
    m = classification_metrics(scores, labels, list("abcd"), n_boot=100, seed=5)
    idx = np.random.default_rng(5).integers(0, 60, size=(100, 60))  # the same draws, one block at this size
    loop = [f1_score(labels[i], predictions[i], average="macro", zero_division=0) for i in idx]
    assert m["ci95"]["macro_f1"] == pytest.approx(list(np.percentile(loop, [2.5, 97.5])))
    balanced = [balanced_accuracy_score(labels[i], predictions[i]) for i in idx]
    assert m["ci95"]["balanced_accuracy"] == pytest.approx(list(np.percentile(balanced, [2.5, 97.5])))


def test_perfect_scores_give_unit_intervals():
    labels = np.array([0, 1, 2, 3, 0, 1])
    m = classification_metrics(np.eye(4)[labels], labels, list("abcd"))
    assert m["top1"] == m["macro_f1"] == m["balanced_accuracy"] == 1.0
    assert m["ci95"] == {"top1": [1.0, 1.0], "top3": [1.0, 1.0], "macro_f1": [1.0, 1.0], "balanced_accuracy": [1.0, 1.0]}
    r = retrieval_metrics(np.eye(5) + 0.1, np.eye(5), n_boot=100)
    assert r["mean_recall_at_1"] == 1.0
    assert r["image_to_text"]["ci95"]["recall@1"] == [1.0, 1.0]


def test_bad_input_is_rejected():
    with pytest.raises(ClipmedError, match="non-finite"):
        classification_metrics(np.array([[np.nan, 1.0]]), np.array([0]), ["x", "y"])
    with pytest.raises(ClipmedError, match="empty"):
        classification_metrics(np.zeros((0, 2)), np.array([], dtype=int), ["x", "y"])
    with pytest.raises(ValueError, match="columns"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 1]), ["x", "y"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.zeros((2, 2)), np.array([0, 2]), ["x", "y"])
    with pytest.raises(ValueError, match="pairs"):
        retrieval_metrics(np.zeros((2, 3)), np.eye(3))
    with pytest.raises(ValueError, match="dimensions"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ClipmedError, match="non-finite"):
        retrieval_metrics(np.array([[np.inf, 0.0]]), np.eye(2), pairs=np.array([0]))


# Retrieval from a similarity matrix S as embeddings (S, I), identity pairs: i2t ranks of the paired text 0, 1, 1; t2i ranks of the paired image 0, 0, 1.
SIM3 = np.array([
    [0.9, 0.1, 0.5],
    [0.8, 0.7, 0.2],
    [0.3, 0.6, 0.4],
])


def test_retrieval_recall_and_precision_by_hand():
    labels = np.array([0, 0, 1])
    r = retrieval_metrics(SIM3, np.eye(3), image_labels=labels, text_labels=labels, ks=(1, 2, 5), n_boot=50)
    i2t, t2i = r["image_to_text"], r["text_to_image"]
    assert (r["n_images"], r["n_texts"], r["ks"]) == (3, 3, [1, 2, 5])
    assert i2t["recall_at"] == pytest.approx({"1": 1 / 3, "2": 1.0, "5": 1.0})
    assert t2i["recall_at"] == pytest.approx({"1": 2 / 3, "2": 1.0, "5": 1.0})
    assert r["mean_recall_at_1"] == pytest.approx(0.5)
    # i2t top lists: img0 -> t0,t2 (labels 0,1); img1 -> t0,t1 (0,0); img2 -> t1,t2 (0,1). K=5 is capped at 3.
    assert i2t["precision_at"] == pytest.approx({"1": 2 / 3, "2": (1 / 2 + 1 + 1 / 2) / 3,
                                                 "5": (2 / 3 + 2 / 3 + 1 / 3) / 3})
    # t2i top lists: t0 -> i0,i1 (0,0); t1 -> i1,i2 (0,1); t2 -> i0,i2 (0,1).
    assert t2i["precision_at"] == pytest.approx({"1": 2 / 3, "2": (1 + 1 / 2 + 1 / 2) / 3, "5": 5 / 9})
    assert i2t["n_queries"] == i2t["n_labelled_queries"] == 3
    assert set(i2t["ci95"]) == {"recall@1", "recall@2", "recall@5", "precision@1", "precision@2", "precision@5"}


def test_retrieval_without_labels_has_no_precision():
    r = retrieval_metrics(SIM3, np.eye(3), n_boot=20)
    assert "precision_at" not in r["image_to_text"] and "n_labelled_queries" not in r["text_to_image"]
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(SIM3, np.eye(3), image_labels=np.array([0, 0, 1]))


def test_retrieval_with_pairs_unpaired_texts_and_missing_labels():
    # 4 images, 4 texts; images 1 and 2 share text 1; text 3 is paired with no image (all its scores tie).
    sim = np.array([
        [0.9, 0.2, 0.1, 0.05],
        [0.5, 0.4, 0.3, 0.05],
        [0.1, 0.3, 0.8, 0.05],
        [0.2, 0.6, 0.7, 0.05],
    ])
    r = retrieval_metrics(sim, np.eye(4), pairs=np.array([0, 1, 1, 2]), image_labels=np.array([0, 1, 1, -1]),
                          text_labels=np.array([0, 1, -1, 1]), ks=(1, 2), n_boot=20)
    i2t, t2i = r["image_to_text"], r["text_to_image"]
    # i2t ranks: 0, 1 (0.5 > 0.4), 1 (0.8 > 0.3), 0.
    assert i2t["recall_at"] == pytest.approx({"1": 0.5, "2": 1.0})
    # t2i: text 0 -> image 0 rank 0; text 1 -> best of image 1 (rank 1) and image 2 (rank 2); text 2 -> image 3 rank 1.
    assert t2i["n_queries"] == 3
    assert t2i["recall_at"] == pytest.approx({"1": 1 / 3, "2": 1.0})
    # P@1 i2t over labelled images 0,1,2: top texts 0 (label 0 ok), 0 (0 != 1), 2 (unlabelled never matches).
    assert i2t["n_labelled_queries"] == 3 and i2t["precision_at"]["1"] == pytest.approx(1 / 3)
    # P@1 t2i over labelled texts 0,1,3: top images 0 (ok), 3 (unlabelled), 0 (tie broken to the lowest index; 0 != 1).
    assert t2i["n_labelled_queries"] == 3 and t2i["precision_at"]["1"] == pytest.approx(1 / 3)


def test_retrieval_is_deterministic():
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(40, 40)) + 2 * np.eye(40)
    labels = rng.integers(0, 3, 40)
    runs = [json.dumps(retrieval_metrics(sim, np.eye(40), image_labels=labels, text_labels=labels, seed=4), allow_nan=False)
            for _ in range(2)]
    assert runs[0] == runs[1]


def _dense_reference(sim: np.ndarray, pairs: np.ndarray, image_labels: np.ndarray, text_labels: np.ndarray,
                     ks: list[int]) -> dict:
    """Retrieval by full stable sorts of the whole similarity matrix: the plain definition, one row at a time."""
    def direction(matrix, positives, query_labels, candidate_labels):
        recall, precision = [], []
        for q, row in enumerate(matrix):
            order = list(np.argsort(-row, kind="stable"))
            if positives[q]:
                rank = min(order.index(c) for c in positives[q])
                recall.append([rank < k for k in ks])
            if query_labels[q] >= 0:
                hits = candidate_labels[order] == query_labels[q]
                precision.append([hits[:min(k, len(row))].mean() for k in ks])
        return np.mean(recall, axis=0), np.mean(precision, axis=0)

    n_img, n_txt = sim.shape
    i2t = direction(sim, [[pairs[i]] for i in range(n_img)], image_labels, text_labels)
    t2i = direction(sim.T, [list(np.flatnonzero(pairs == t)) for t in range(n_txt)], text_labels, image_labels)
    return {"image_to_text": i2t, "text_to_image": t2i}


def test_blocked_retrieval_equals_the_dense_definition_with_ties_and_shared_texts():
    rng = np.random.default_rng(11)
    # Small integer embeddings: exact products, so many exact ties; 30 images, 20 texts, texts shared by images.
    images = rng.integers(-1, 2, size=(30, 3)).astype(np.float64)
    texts = rng.integers(-1, 2, size=(20, 3)).astype(np.float64)
    pairs = rng.integers(0, 18, 30)  # texts 18 and 19 (and any not drawn) are paired with no image
    image_labels = rng.integers(-1, 3, 30)
    text_labels = rng.integers(-1, 3, 20)
    ks = [1, 3, 7, 25]  # 25 exceeds the 20 texts: capped in image->text
    sim = images @ texts.T
    assert len(np.unique(sim)) < 10  # ties everywhere
    reference = _dense_reference(sim, pairs, image_labels, text_labels, ks)
    kwargs = dict(pairs=pairs, image_labels=image_labels, text_labels=text_labels, ks=ks, n_boot=50, seed=3)
    whole = retrieval_metrics(images, texts, **kwargs)
    for block_rows in (1, 4, 7):  # smaller than both N, uneven last blocks
        assert retrieval_metrics(images, texts, block_rows=block_rows, **kwargs) == whole
    for name in ("image_to_text", "text_to_image"):
        recall, precision = reference[name]
        assert list(whole[name]["recall_at"].values()) == pytest.approx(list(recall))
        assert list(whole[name]["precision_at"].values()) == pytest.approx(list(precision))
    assert whole["text_to_image"]["n_queries"] == len(np.unique(pairs))
    assert whole["mean_recall_at_1"] == pytest.approx((reference["image_to_text"][0][0]
                                                       + reference["text_to_image"][0][0]) / 2)


def test_top_indices_match_a_stable_sort():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)
    for depth in (1, 5, 39, 40):
        assert np.array_equal(_top_indices(scores, depth), np.argsort(-scores, axis=1, kind="stable")[:, :depth])


def test_bootstrap_means_from_counts_equal_the_gathered_means():
    values = np.random.default_rng(6).random((70, 3))
    idx = np.random.default_rng(9).integers(0, 70, size=(200, 70))  # the draws of seed 9, one block at this size
    expected = [list(np.percentile(values[idx, j].mean(axis=1), [2.5, 97.5])) for j in range(3)]
    got = bootstrap_mean_intervals(values, 200, 9)
    for interval, want in zip(got, expected):
        assert interval == pytest.approx(want)
