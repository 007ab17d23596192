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


def test_explicit_classes_keep_the_users_order_and_spelling():
    result = clean_labels(["Spine", "spine", "Chest", "Dental"], classes=[" Spine", "chest"])
    assert result.classes == ["Spine", "chest"]
    assert result.labels == ["Spine", "Spine", "chest", None]
    assert result.merged == {"Chest": "chest", "spine": "Spine"}
    assert result.dropped == {3: "label 'Dental' is not one of --classes"}
    exact = clean_labels(["Spine", "spine", "Chest", "Dental"], classes=[" Spine", "Chest"], case_sensitive=True)
    assert exact.labels == ["Spine", None, "Chest", None] and not exact.merged


def test_case_and_whitespace_variants_merge_into_the_most_frequent_spelling():
    raw = ["Chest"] * 2 + ["chest "] + ["CHEST"] * 2 + ["Head  and\tNeck", "head and neck", "Spine", "spine", "x"]
    result = clean_labels(raw, min_class_count=2)
    # Chest 2 and CHEST 2 tie: the first in sorted order ('CHEST' < 'Chest') names the class.
    assert result.classes == ["CHEST", "Head and Neck", "Spine"]
    assert result.labels == ["CHEST"] * 5 + ["Head and Neck"] * 2 + ["Spine"] * 2 + [None]
    assert result.merged == {"Chest": "CHEST", "chest": "CHEST", "head and neck": "Head and Neck",
                             "spine": "Spine"}
    assert result.dropped == {9: "label 'x' has 1 usable rows, under --min-class-count 2"}
    exact = clean_labels(raw, min_class_count=2, case_sensitive=True)
    assert exact.classes == ["CHEST", "Chest"] and exact.labels[2] is None and not exact.merged


@pytest.mark.parametrize(("classes", "message"), [
    ([], "one or more"), (["A", " "], "non-empty"), (["A", "B", "A "], "A more than once"),
    (["A", "a"], "A, a more than once"),
])
def test_bad_explicit_classes(classes, message):
    with pytest.raises(ClipmedError, match=message):
        clean_labels(["A"], classes=classes)


def test_min_class_count_must_be_positive():
    with pytest.raises(ClipmedError, match="--min-class-count"):
        clean_labels(["A"], min_class_count=0)
