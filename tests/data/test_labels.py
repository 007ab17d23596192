"""Label cleaning: which values are classes, and which rows are unlabeled."""

from __future__ import annotations

import pytest

from clipmed.data.labels import clean_labels
from clipmed.errors import ClipmedError


def test_classes_are_values_with_enough_rows_sorted_and_stripped():
    raw = ["Chest"] * 3 + [" Abdomen "] * 2 + ["Abdomen"] + ["a long free-text answer", None, "  "]
    result = clean_labels(raw, min_class_count=3)
    assert result.classes == ["Abdomen", "Chest"]
    assert result.labels == ["Chest"] * 3 + ["Abdomen"] * 3 + [None, None, None]
    assert result.unlabeled == 3


def test_explicit_classes_keep_the_users_order_and_exact_matching():
    result = clean_labels(["Spine", "spine", "Chest", "Dental"], classes=[" Spine", "Chest"])
    assert result.classes == ["Spine", "Chest"]
    assert result.labels == ["Spine", None, "Chest", None]


@pytest.mark.parametrize(("classes", "message"), [
    ([], "one or more"), (["A", " "], "non-empty"), (["A", "B", "A "], "A more than once"),
])
def test_bad_explicit_classes(classes, message):
    with pytest.raises(ClipmedError, match=message):
        clean_labels(["A"], classes=classes)


def test_min_class_count_must_be_positive():
    with pytest.raises(ClipmedError, match="--min-class-count"):
        clean_labels(["A"], min_class_count=0)
