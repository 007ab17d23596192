"""Turn raw label values into classes: which values count as classes, and each row's clean label.

Label fields of medical image-text data are noisy: weak labels with a long tail, and in PubMedVision some
rows hold free text instead of a category. A value is a class when the user lists it (`classes`) or else
when at least `min_class_count` rows carry it; every other row is *unlabeled*: it still serves caption
objectives and retrieval, but never label objectives or classification scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from clipmed.errors import ClipmedError

DEFAULT_MIN_CLASS_COUNT = 20


@dataclass(frozen=True)
class LabelSet:
    """The classes and, parallel to the input, each row's clean label (None: unlabeled)."""

    classes: list[str]
    labels: list[str | None]

    @property
    def unlabeled(self) -> int:
        return sum(label is None for label in self.labels)


def strip_label(value: str | None) -> str | None:
    """The comparable form of a raw label: surrounding whitespace removed, empty meaning none."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def clean_labels(raw: Sequence[str | None], *, classes: Sequence[str] | None = None,
                 min_class_count: int = DEFAULT_MIN_CLASS_COUNT) -> LabelSet:
    """Choose the classes and clean every row's label.

    Explicit `classes` keep the user's order (it is the order of class indices); otherwise the classes are
    the values with at least `min_class_count` rows, sorted. Comparison is exact after stripping whitespace.
    """
    stripped = [strip_label(value) for value in raw]
    if classes is not None:
        chosen = [strip_label(name) for name in classes]
        if not chosen or any(name is None for name in chosen):
            raise ClipmedError("--classes needs one or more non-empty class names")
        duplicates = sorted(name for name, count in Counter(chosen).items() if count > 1)
        if duplicates:
            raise ClipmedError(f"--classes lists {', '.join(duplicates)} more than once")
        class_list: list[str] = list(chosen)  # type: ignore[arg-type]  # no None left, checked above
    else:
        if min_class_count < 1:
            raise ClipmedError(f"--min-class-count must be at least 1, not {min_class_count}")
        counts = Counter(value for value in stripped if value is not None)
        class_list = sorted(value for value, count in counts.items() if count >= min_class_count)
    known = set(class_list)
    return LabelSet(class_list, [value if value in known else None for value in stripped])
