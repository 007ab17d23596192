"""prepare: validation, the paper's split, split.json / rejected.jsonl, and reading them back."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipmed.data.records import FieldMap
from clipmed.data.sources import FORMATS
from clipmed.data.split import load_for_evaluation, load_prepared, prepare, read_manifest
from clipmed.errors import ClipmedError

COUNTS = {"A": 60, "B": 35, "C": 22, "rare": 5, None: 20}
GROUPED = FieldMap(group_field="article")


def _prepare(source, out, **options):
    return prepare(str(source), out, progress=False, **options)


def _split(out) -> dict:
    return read_manifest(out)


def _rejected(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "rejected.jsonl").read_text().splitlines()]


@pytest.fixture
def source(tmp_path, kit):
    """An imagefolder: classes A, B, C; `rare` (5 rows) and null labels are unlabeled; groups of 3."""
    rows = kit.rows(tmp_path / "src", COUNTS, group_size=3)
    return Path(kit.write("imagefolder", tmp_path / "src", rows)), rows


def test_sizes_stratification_cap_and_pool(tmp_path, source):
    path, rows = source
    summary = _prepare(path, tmp_path / "out")
    manifest = _split(tmp_path / "out")
    labels = {row["id"]: row["body_part"] for row in rows}
    splits = manifest["splits"]
    assert manifest["classes"] == summary["classes"] == ["A", "B", "C"]
    sample = {"A": 60, "B": 35, "C": 22}
    for name in ("val", "test"):
        have = Counter(labels[rid] for rid in splits[name])
        assert sum(have.values()) == 12  # 10% of 117, rounded
        for cls, count in sample.items():
            assert abs(have[cls] - count / 10) < 1
        assert manifest["counts"][name] == dict(have)
    cap = (117 - 24) // 3
    train = Counter(labels[rid] for rid in splits["train"])
    assert manifest["counts"]["train_cap"] == cap == 31
    for cls, count in sample.items():
        left = count - manifest["counts"]["val"][cls] - manifest["counts"]["test"][cls]
        assert train[cls] == min(cap, left)
    held = set(splits["val"]) | set(splits["test"])
    assert not held & set(splits["pool"]) and not set(splits["val"]) & set(splits["test"])
    assert set(splits["train"]) <= set(splits["pool"])
    assert len(splits["pool"]) + len(held) + manifest["counts"]["held_out_by_group"] == len(rows)
    pool_labels = Counter(labels[rid] in sample for rid in splits["pool"])
    assert manifest["counts"]["pool"] == {"labeled": pool_labels[True], "unlabeled": pool_labels[False]}
    assert manifest["counts"]["unlabeled"] == 25 and manifest["counts"]["rejected_total"] == 0
    assert all(ids == sorted(ids) for ids in splits.values())
    assert sorted(manifest) == ["allow_outside_paths", "check_images", "classes", "complete", "counts", "fields",
                                "format_version", "ids", "image_only", "labels", "min_class_count", "n", "seed",
                                "source", "splits", "text_only"]
    assert manifest["source"]["path"] == str(path) and manifest["source"]["format"] == "imagefolder"
    assert summary["sizes"] == {"train": 31 + 27 + 18, "val": 12, "test": 12, "pool": len(splits["pool"]),
                                "text_only": 0, "image_only": 0}


def test_no_group_straddles_two_splits(tmp_path, source):
    path, rows = source
    for k, row in enumerate(rows[117:]):  # unlabeled rows join groups of labeled ones
        row["article"] = rows[3 * k]["article"]
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _prepare(path, tmp_path / "out", fields=GROUPED)
    manifest = _split(tmp_path / "out")
    group = {row["id"]: row["article"] for row in rows}
    groups = {name: {group[rid] for rid in ids} for name, ids in manifest["splits"].items()}
    assert not groups["val"] & groups["test"]
    assert not (groups["val"] | groups["test"]) & (groups["train"] | groups["pool"])
    # Rows of a val/test group that were not themselves held out belong to no split.
    held_groups = groups["val"] | groups["test"]
    everywhere = {rid for ids in manifest["splits"].values() for rid in ids}
    assert manifest["counts"]["held_out_by_group"] == sum(
        group[row["id"]] in held_groups and row["id"] not in everywhere for row in rows) > 0


def test_same_seed_gives_identical_files_and_another_seed_another_split(tmp_path, source):
    path, _ = source
    for out in ("a", "b"):
        _prepare(path, tmp_path / out, fields=GROUPED, seed=3)
    assert (tmp_path / "a/split.json").read_bytes() == (tmp_path / "b/split.json").read_bytes()
    assert (tmp_path / "a/rejected.jsonl").read_bytes() == (tmp_path / "b/rejected.jsonl").read_bytes()
    _prepare(path, tmp_path / "c", fields=GROUPED, seed=4)
    assert _split(tmp_path / "c")["splits"]["val"] != _split(tmp_path / "a")["splits"]["val"]


def test_every_format_gives_the_same_split(tmp_path, kit):
    rows = kit.rows(tmp_path, {"A": 25, "B": 20, None: 3}, group_size=2)
    splits = {}
    for fmt in FORMATS:
        path = kit.write(fmt, tmp_path, rows)
        image_root = str(tmp_path) if fmt == "pubmedvision" else None
        _prepare(path, tmp_path / fmt, fields=GROUPED, image_root=image_root)
        manifest = _split(tmp_path / fmt)
        assert manifest["source"]["format"] == fmt
        splits[fmt] = manifest["splits"]
    assert all(split == splits["imagefolder"] for split in splits.values())


def test_sampling_n_rows_stratified(tmp_path, source):
    path, _ = source
    summary = _prepare(path, tmp_path / "out", n=30)
    counts = summary["counts"]
    assert counts["sample"] == {"A": 15, "B": 9, "C": 6}
    # Sample 15/9/6 (largest remainder of 15.4/9.0/5.6); val 3 rows: shares 1.5/0.9/0.6.
    assert counts["val"] == counts["test"] == {"A": 1, "B": 1, "C": 1}
    assert counts["train_cap"] == (30 - 6) // 3
    # The pool keeps the labeled rows the sample left out.
    assert counts["pool"]["labeled"] == 117 - 6
    with pytest.raises(ClipmedError, match="--n 9"):
        _prepare(path, tmp_path / "out", n=5)


@pytest.fixture
def dirty(tmp_path, kit, source):
    """The fixture source plus one row of every kind of problem (and of every convertible image mode)."""
    path, rows = source
    images = path / "images"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "full.jpg")
    data = (images / "full.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 900).save(images / "deep.png")
    for name, mode in (("cmyk.jpg", "CMYK"), ("pal.png", "P"), ("alpha.png", "RGBA")):
        kit.save_image(images / name, mode)
    kit.png_header_only(images / "huge.png", 10_000, 10_000)
    extra = [
        ("bad-cut", "images/cut.jpg", "ok"), ("bad-missing", "images/missing.png", "ok"),
        ("bad-empty", "images/empty.jpg", "ok"), ("bad-text", "images/text.jpg", "ok"),
        ("bad-huge", "images/huge.png", "ok"), ("bad-none", None, "ok"),
        ("ok-deep", "images/deep.png", "ok"), ("ok-cmyk", "images/cmyk.jpg", "ok"),
        ("ok-pal", "images/pal.png", "ok"), ("ok-alpha", "images/alpha.png", "ok"),
        ("bad-caption", "images/full.jpg", "   "), ("bad-null", "images/full.jpg", None),
        ("bad-both", "images/missing.png", ""), (rows[0]["id"], "images/full.jpg", "duplicate"),
    ]
    for rid, image, caption in extra:
        rows.append({"file_name": image, "id": rid, "caption": caption, "body_part": "A", "article": rid})
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def test_every_kind_of_bad_row_is_rejected_and_image_faults_keep_the_text(tmp_path, dirty):
    path, _ = dirty
    summary = _prepare(path, tmp_path / "out")
    manifest = _split(tmp_path / "out")
    entries = _rejected(tmp_path / "out")
    rejected = {(entry["id"], entry["locator"]): entry for entry in entries if entry["uses"] != "unlabeled"}
    by_id = {rid: entry for (rid, _), entry in rejected.items() if rid.startswith("bad")}
    expected = {
        "bad-cut": "truncated or corrupt image: ", "bad-missing": "missing file", "bad-empty": "zero-byte file",
        "bad-text": "not an image", "bad-huge": "image too large: 10000x10000", "bad-none": "no image path",
    }
    for rid, reason in expected.items():
        assert by_id[rid]["reason"].startswith(reason) and by_id[rid]["reason"].endswith("(kept as a text-only row)")
        assert by_id[rid]["uses"] == "text-only"
    assert manifest["text_only"] == sorted(expected)
    assert by_id["bad-caption"] == {"id": "bad-caption", "locator": "metadata.jsonl:153",
                                    "reason": "empty caption (kept as an image-only row)", "uses": "image-only"}
    assert by_id["bad-null"]["reason"] == "missing caption (kept as an image-only row)"
    assert manifest["image_only"] == ["bad-caption", "bad-null"]
    assert by_id["bad-both"]["reason"] == "empty caption; missing file" and by_id["bad-both"]["uses"] == "none"
    duplicate = rejected[("id0000", "metadata.jsonl:156")]
    assert duplicate["reason"] == "duplicate id (first seen at metadata.jsonl:1)"
    assert summary["counts"]["rejected"] == {
        "duplicate id": 1, "empty caption": 1, "image too large": 1, "missing caption": 1, "missing file": 1,
        "no image path": 1, "not an image": 1, "truncated or corrupt image": 1, "unusable caption and image": 1,
        "zero-byte file": 1}
    assert summary["counts"]["rejected_total"] == len(rejected) == 10
    # The rows of the class with too few rows are listed too, as unlabeled rows, after the rejected ones.
    assert entries[10:] == [{"id": f"id{index:04d}", "locator": f"metadata.jsonl:{index + 1}", "uses": "unlabeled",
                             "reason": "label 'rare' has 5 usable rows, under --min-class-count 20 (kept as an "
                                       "unlabeled row)"} for index in range(117, 122)]
    assert summary["counts"]["label_dropped"] == 5
    placed = {rid for ids in manifest["splits"].values() for rid in ids}
    assert {"ok-deep", "ok-cmyk", "ok-pal", "ok-alpha"} <= placed
    assert not placed & set(by_id)
    prepared = load_prepared(tmp_path / "out")
    assert [r.id for r in prepared.text_only_records()] == sorted(expected)
    assert [r.id for r in prepared.image_only_records()] == ["bad-caption", "bad-null"]


def test_strict_mode_stops_at_the_first_rejection(tmp_path, dirty):
    path, _ = dirty
    with pytest.raises(ClipmedError, match=r"metadata\.jsonl:143: truncated or corrupt image.*--strict"):
        _prepare(path, tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "split.json").exists()


def test_without_image_checks_only_existence_is_checked(tmp_path, dirty):
    path, _ = dirty
    summary = _prepare(path, tmp_path / "out", check_images=False)
    assert summary["counts"]["rejected"]["missing file"] == 1
    assert "truncated or corrupt image" not in summary["counts"]["rejected"]


def test_nothing_usable_says_what_to_check(tmp_path, source):
    path, rows = source
    with pytest.raises(ClipmedError, match="no usable row.*missing file 142.*--image-root"):
        _prepare(path, tmp_path / "out", image_root=str(tmp_path))
    with pytest.raises(ClipmedError, match="none of the 142 usable rows.*'A' 60.*--min-class-count"):
        _prepare(path, tmp_path / "out", min_class_count=100)


def test_explicit_classes_order_and_too_small_classes(tmp_path, source):
    path, _ = source
    summary = _prepare(path, tmp_path / "out", classes=["C", "A"])
    assert summary["classes"] == ["C", "A"] and _split(tmp_path / "out")["classes"] == ["C", "A"]
    assert summary["counts"]["unlabeled"] == 35 + 5 + 20
    prepared = load_prepared(tmp_path / "out")
    first = prepared.records("train")[0]
    assert prepared.label_index(first) == ["C", "A"].index(first.label)
    with pytest.raises(ClipmedError, match="class 'nope' has 0 usable labeled rows.*--min-class-count"):
        _prepare(path, tmp_path / "out2", classes=["A", "nope"])
    # Every row in one group: no class can be spread over the splits.
    with pytest.raises(ClipmedError, match="class 'A': none of its rows could go to val.*--group-field"):
        _prepare(path, tmp_path / "out2", fields=FieldMap(group_field="license"))


def test_load_prepared_gives_clean_records_per_split(tmp_path, source):
    path, rows = source
    raw = {row["id"]: row["body_part"] for row in rows}
    _prepare(path, tmp_path / "out", fields=GROUPED)
    prepared = load_prepared(tmp_path / "out")
    assert prepared.classes == ["A", "B", "C"]
    for split in ("train", "val", "test"):
        records = prepared.records(split)
        assert [r.id for r in records] == prepared.manifest["splits"][split]
        assert all(r.label == raw[r.id] and r.image_path and r.group for r in records)
    pool = prepared.records("pool")
    assert {r.label for r in pool if raw[r.id] in (None, "rare")} == {None}
    assert all(r.extra["license"] == "CC BY" for r in pool)
    unlabeled = next(r for r in pool if r.label is None)
    with pytest.raises(ValueError):
        prepared.label_index(unlabeled)
    with pytest.raises(ClipmedError, match="unknown split"):
        prepared.records("validation")


def test_load_prepared_refuses_a_changed_source(tmp_path, source):
    path, rows = source
    _prepare(path, tmp_path / "out")
    with open(path / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps(dict(rows[0], id="new")) + "\n")
    with pytest.raises(ClipmedError, match="changed since `clipmed prepare`.*re-run prepare"):
        load_prepared(tmp_path / "out")
    with pytest.raises(ClipmedError, match="no split.json"):
        load_prepared(tmp_path / "elsewhere")


def test_load_for_evaluation_returns_every_usable_labeled_row(tmp_path, dirty):
    path, _ = dirty
    records, classes = load_for_evaluation(str(path))
    assert classes == ["A", "B", "C"]
    assert len(records) == 60 + 35 + 22 + 4  # the four convertible images are labeled A
    assert not any(r.id.startswith("bad") for r in records) and all(r.label in classes for r in records)


def test_the_split_of_a_fixed_dataset_is_pinned(tmp_path, kit):
    """The ids below were computed by the clipmed of before streaming sources, worker checks and the Parquet
    manifest: the same seed on the same data must keep giving the same split."""
    rows = kit.rows(tmp_path / "src", {"A": 14, "B": 9, "C": 7, "rare": 2, None: 3})
    path = kit.write("imagefolder", tmp_path / "src", rows)
    _prepare(path, tmp_path / "out", fields=GROUPED, min_class_count=5, seed=5, n=26)
    splits = load_prepared(tmp_path / "out").manifest["splits"]
    ids = lambda *numbers: [f"id{number:04d}" for number in numbers]  # noqa: E731
    assert splits["val"] == ids(11, 18, 26) and splits["test"] == ids(13, 20, 27)
    assert splits["train"] == ids(1, 5, 7, 9, 10, 12, 14, 15, 16, 17, 19, 21, 23, 24, 28, 29)
    assert splits["pool"] == [rid for rid in ids(*range(35)) if rid not in splits["val"] + splits["test"]]


def test_strict_refusal_does_not_claim_to_keep_the_row(tmp_path, dirty):
    path, _ = dirty
    with pytest.raises(ClipmedError) as info:
        _prepare(path, tmp_path / "out", strict=True)
    assert "kept as" not in str(info.value)


def test_paths_outside_the_dataset_are_rejected_and_the_policy_recorded(tmp_path, source, kit):
    path, rows = source
    outside = kit.save_image(tmp_path / "outside" / "x.png")
    (path / "images" / "link.png").symlink_to(outside)
    rows += [dict(rows[0], id="escape", file_name="../outside/x.png"),
             dict(rows[0], id="absolute", file_name=str(outside)),
             dict(rows[0], id="link", file_name="images/link.png")]
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = _prepare(path, tmp_path / "out")
    rejected = {entry["id"]: entry for entry in _rejected(tmp_path / "out") if entry["uses"] != "unlabeled"}
    assert sorted(rejected) == ["absolute", "escape", "link"]
    assert all(entry["reason"].startswith("image path outside the dataset folder") and
               entry["uses"] == "text-only" for entry in rejected.values())
    assert summary["counts"]["rejected"] == {"image path outside the dataset folder": 3}
    assert load_prepared(tmp_path / "out").manifest["allow_outside_paths"] is False
    assert [r.id for r in load_prepared(tmp_path / "out").text_only_records()] == ["absolute", "escape", "link"]
    _prepare(path, tmp_path / "allowed", allow_outside_paths=True)
    prepared = load_prepared(tmp_path / "allowed")
    assert prepared.manifest["allow_outside_paths"] is True
    assert {entry["uses"] for entry in _rejected(tmp_path / "allowed")} == {"unlabeled"}
    assert prepared.record("escape").image_path == str(outside)


def test_validation_indices_are_those_of_the_source_records(tmp_path, dirty):
    from clipmed.data.sources import load_source
    from clipmed.data.split import validate

    path, rows = dirty
    loaded = load_source(str(path))
    checked = validate(loaded)
    assert checked.ids == [r.id for r in loaded.records] and checked.locators == loaded.locators
    assert {loaded.records[i].id for i in checked.text_only} == {r for r in checked.ids if r.startswith("bad-")
                                                               and r not in ("bad-caption", "bad-null", "bad-both")}
    duplicate = len(rows) - 1  # the last row repeats the first id: rejected, and not usable
    assert loaded.records[duplicate].id == rows[0]["id"] and duplicate not in checked.usable


def test_a_malformed_or_non_utf8_line_is_one_rejected_row_and_strict_refuses_it(tmp_path, source):
    path, _ = source
    with open(path / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "images/img_0000.png", "caption": oops}\n')
        handle.write(b'{"file_name": "images/img_0000.png", "caption": "caf\xe9", "id": "latin1"}\n')
    summary = _prepare(path, tmp_path / "out")
    rejected = [entry for entry in _rejected(tmp_path / "out") if entry["uses"] == "none"]
    assert rejected == [
        {"id": None, "locator": "metadata.jsonl:143", "uses": "none",
         "reason": "unparseable row: not valid JSON (Expecting value)"},
        {"id": None, "locator": "metadata.jsonl:144", "uses": "none",
         "reason": "unparseable row: not UTF-8 text (byte 0xe9 at column 53); save metadata.jsonl as UTF-8"}]
    assert summary["counts"]["rejected"] == {"unparseable row": 2} and summary["counts"]["rows"] == 144
    with pytest.raises(ClipmedError, match=r"^metadata\.jsonl:143: unparseable row: not valid JSON .*--strict"):
        _prepare(path, tmp_path / "strict", strict=True)


def test_evaluation_of_a_raw_dataset_applies_the_path_policy(tmp_path, source, kit):
    path, rows = source
    outside = kit.save_image(tmp_path / "elsewhere" / "x.png")
    rows.append(dict(rows[0], id="outside", file_name=str(outside)))
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, _ = load_for_evaluation(str(path))
    assert "outside" not in {r.id for r in records} and len(records) == 117
    records, _ = load_for_evaluation(str(path), allow_outside_paths=True)
    assert "outside" in {r.id for r in records}
