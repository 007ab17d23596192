"""Property tests: any metadata loads or fails cleanly; the split's invariants hold for any rows."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipmed.data.records import FieldMap
from clipmed.data.split import SplitRow, assign_splits, load_prepared, prepare
from clipmed.errors import ClipmedError

PROPERTIES = settings(max_examples=50, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ODD_TEXT = st.sampled_from(["", " ", "Chest", " Chest ", "a/b", "../x", "\x00", "\ud800", "é", "null"])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), ODD_TEXT,
                   st.text(max_size=5))
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=2), st.dictionaries(ODD_TEXT, SCALAR, max_size=2))
FIELD = st.sampled_from(["file_name", "id", "caption", "body_part", "article", "source"])
IMAGE = st.sampled_from(["good.png", "missing.png", "text.png", "good.png", None, 3])


@st.composite
def metadata_lines(draw):
    """metadata.jsonl lines: mostly plausible rows with odd values, some arbitrary JSON or garbage."""
    lines = []
    for index in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["row", "row", "row", "row", "odd", "json", "garbage"]))
        if kind == "garbage":
            lines.append(draw(st.text(min_size=1, max_size=10)).replace("\n", " "))
        elif kind == "json":
            lines.append(json.dumps(draw(VALUE)))
        else:
            row = {"file_name": draw(IMAGE), "id": draw(st.sampled_from([f"r{index}", f"r{index}", "dup", 7])),
                   "caption": draw(st.sampled_from(["a figure", "a figure", " ", None])),
                   "body_part": draw(st.sampled_from(["Chest", "Chest", "Head", " Head", None])),
                   "article": draw(st.sampled_from(["p1", "p2", None, f"p{index}"]))}
            if kind == "odd":
                row.update(draw(st.dictionaries(FIELD, VALUE, max_size=3)))
            lines.append(json.dumps(row))
    return lines


@pytest.fixture(scope="module")
def images(tmp_path_factory, kit):
    folder = tmp_path_factory.mktemp("images")
    kit.save_image(folder / "good.png")
    (folder / "text.png").write_text("not an image")
    return folder


@PROPERTIES
@given(lines=metadata_lines(), min_class_count=st.integers(1, 4), group=st.booleans(), seed=st.integers(0, 3))
def test_any_metadata_prepares_or_raises_a_clipmed_error(images, lines, min_class_count, group, seed):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        fields = FieldMap(group_field="article" if group else None)
        try:
            summary = prepare(tmp, Path(tmp) / "out", fields=fields, image_root=str(images),
                              min_class_count=min_class_count, seed=seed, progress=False)
        except ClipmedError as exc:
            assert str(exc) and "\n" not in str(exc)  # the CLI prints it on one line
            return
        prepared = load_prepared(Path(tmp) / "out")
        assert summary["sizes"]["val"] == len(prepared.records("val")) > 0
        assert all(r.label in prepared.classes for r in prepared.records("test"))


@st.composite
def split_rows(draw):
    n_rows = draw(st.integers(0, 120))
    labels = draw(st.lists(st.sampled_from(["A", "B", "C", None]), min_size=n_rows, max_size=n_rows))
    grouped = draw(st.booleans())
    groups = draw(st.lists(st.integers(0, max(1, n_rows // 2)), min_size=n_rows, max_size=n_rows))
    return [SplitRow(f"r{i:03d}", label, f"g{g}" if grouped else None)
            for i, (label, g) in enumerate(zip(labels, groups))]


@PROPERTIES
@given(rows=split_rows(), n=st.integers(1, 150), seed=st.integers(0, 10))
def test_split_invariants(rows, n, seed):
    classes = sorted({row.label for row in rows if row.label is not None})
    if not classes:
        return
    try:
        plan = assign_splits(rows, classes, n=n, seed=seed)
    except ClipmedError:
        return
    assert plan == assign_splits(rows, classes, n=n, seed=seed)
    label = {row.id: row.label for row in rows}
    group = {row.id: row.group for row in rows}
    val, test, train, pool = set(plan.val), set(plan.test), set(plan.train), set(plan.pool)
    assert not (val & test) and not ((val | test) & pool) and train <= pool
    assert not set(plan.held_out) & (val | test | pool)
    assert len(val | test | pool) + len(plan.held_out) == len(rows)
    groups = {name: {group[r] for r in ids} - {None} for name, ids in
              (("val", val), ("test", test), ("pool", pool))}
    assert not groups["val"] & groups["test"] and not (groups["val"] | groups["test"]) & groups["pool"]
    for name in classes:  # every class is in every split
        for ids in (val, test, train):
            assert any(label[r] == name for r in ids)
    train_counts = Counter(label[r] for r in train)
    assert plan.train_cap == (plan.sample_size - len(val) - len(test)) // len(classes)
    assert max(train_counts.values()) <= plan.train_cap
    if all(row.group is None for row in rows):  # groups can make exact shares impossible
        for name in classes:
            held = [Counter(label[r] for r in ids)[name] for ids in (val, test)]
            assert all(abs(count - plan.sampled[name] / 10) < 1 for count in held)
            assert train_counts[name] == min(plan.train_cap, plan.sampled[name] - sum(held))
