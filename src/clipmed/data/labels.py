"""Turn raw label values into classes: which values count as classes, and each row's clean label.

Label fields of medical image-text data are noisy: weak labels with a long tail, spellings that differ only in
case or spacing (``"chest "``, ``"CHEST"``, ``"Chest"``), and in PubMedVision some rows hold free text instead
of a category. Whitespace is normalised (stripped, inner runs made one space); unless `case_sensitive`,
spellings that differ only in case are one value, written as its most frequent spelling (ties: the first in
sorted order). A value is a class when the user lists it (`classes`) or else when at least `min_class_count`
rows carry it; every other row is *unlabeled*: it still serves caption objectives and retrieval, but never
label objectives or classification scores, and `LabelSet.dropped` says why for each row that had a value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from clipmed.data.records import Record
from clipmed.errors import ClipmedError

DEFAULT_MIN_CLASS_COUNT = 20


@dataclass(frozen=True)
class LabelSet:
    """The classes and, parallel to the input, each row's clean label (None: unlabeled).

    `merged` maps each spelling folded into a class to that class (case variants); `dropped` maps the position
    of each row whose value is not a class to the reason.
    """

    classes: list[str]
    labels: list[str | None]
    merged: dict[str, str]
    dropped: dict[int, str]

    @property
    def unlabeled(self) -> int:
        return sum(label is None for label in self.labels)


def strip_label(value: str | None) -> str | None:
    """Surrounding whitespace removed, empty meaning none: how groups compare, and labels of manifests written
    before whitespace and case were normalised."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def normalise_label(value: str | None) -> str | None:
    """Whitespace normalised (stripped, inner runs one space), empty meaning none."""
    if value is None:
        return None
    return " ".join(value.split()) or None


def clean_labels(raw: Sequence[str | None], *, classes: Sequence[str] | None = None,
                 min_class_count: int = DEFAULT_MIN_CLASS_COUNT, case_sensitive: bool = False) -> LabelSet:
    """Choose the classes and clean every row's label (see the module docstring).

    Explicit `classes` keep the user's order and spelling (it is the order of class indices); otherwise the
    classes are the values with at least `min_class_count` rows, sorted.
    """
    values = [normalise_label(value) for value in raw]
    fold = (lambda text: text) if case_sensitive else str.casefold
    spellings = Counter(value for value in values if value is not None)
    if classes is not None:
        chosen = [normalise_label(name) for name in classes]
        if not chosen or any(name is None for name in chosen):
            raise ClipmedError("--classes needs one or more non-empty class names")
        folded = Counter(fold(name) for name in chosen)  # type: ignore[arg-type]
        duplicates = sorted({name for name in chosen if folded[fold(name)] > 1})  # type: ignore[arg-type]
        if duplicates:
            raise ClipmedError(f"--classes lists {', '.join(duplicates)} more than once")
        class_list: list[str] = list(chosen)  # type: ignore[arg-type]  # no None left, checked above
        canonical = {fold(name): name for name in class_list}
    else:
        if min_class_count < 1:
            raise ClipmedError(f"--min-class-count must be at least 1, not {min_class_count}")
        canonical = {}
        for spelling, _ in sorted(spellings.items(), key=lambda item: (-item[1], item[0])):
            canonical.setdefault(fold(spelling), spelling)  # the most frequent spelling comes first
        totals = Counter({canonical[fold(spelling)]: 0 for spelling in spellings})
        for spelling, count in spellings.items():
            totals[canonical[fold(spelling)]] += count
        class_list = sorted(value for value, count in totals.items() if count >= min_class_count)
    known = set(class_list)
    labels: list[str | None] = []
    dropped: dict[int, str] = {}
    merged: dict[str, str] = {}
    for position, value in enumerate(values):
        label = canonical.get(fold(value)) if value is not None else None
        if label in known:
            labels.append(label)
            if value != label:
                merged[value] = label  # type: ignore[index]  # value is not None here
            continue
        labels.append(None)
        if value is not None:
            dropped[position] = (f"label {value!r} is not one of --classes" if classes is not None else
                                 f"label {value!r} has {totals[label]} usable rows, under --min-class-count "
                                 f"{min_class_count}")
    return LabelSet(class_list, labels, dict(sorted(merged.items())), dropped)


def relabel(records: Sequence[Record], rows: Sequence[Record], field: str, *, classes: Sequence[str] | None = None,
            min_class_count: int = DEFAULT_MIN_CLASS_COUNT) -> tuple[list[Record], list[str]]:
    """`records` labeled by another field of the source (e.g. modality on data prepared for body_part): the
    classes are those of that field over `rows` (the prepared rows; or `classes`), and only the records whose
    value is one of them are kept."""
    values = [None if r.extra.get(field) is None else str(r.extra[field]) for r in rows]
    if all(value is None for value in values):
        raise ClipmedError(f"no prepared row has a {field!r} field: name a field of the source with --label-field")
    chosen = clean_labels(values, classes=classes, min_class_count=min_class_count).classes
    if len(chosen) < 2:
        raise ClipmedError(f"field {field!r} has {len(chosen)} class(es) with at least {min_class_count} rows: lower "
                           "--min-class-count or pass --classes")
    cleaned = clean_labels([None if r.extra.get(field) is None else str(r.extra[field]) for r in records],
                           classes=chosen)
    return [replace(r, label=label) for r, label in zip(records, cleaned.labels) if label is not None], chosen
