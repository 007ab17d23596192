"""prepare at scale: worker processes, resumable image checks, the Parquet manifest and its completeness, the lock,
streaming sources end to end, and the label policy recorded in split.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clipmed.data import images, split
from clipmed.data.records import FieldMap
from clipmed.data.split import load_prepared, prepare, read_manifest
from clipmed.errors import ClipmedError
from clipmed.locking import FileLock

GROUPED = FieldMap(group_field="article")


@pytest.fixture
def source(tmp_path, kit):
    rows = kit.rows(tmp_path / "src", {"A": 24, "B": 16, None: 4}, group_size=2)
    rows[5]["file_name"] = "images/missing.png"
    return Path(kit.write("imagefolder", tmp_path / "src", rows)), rows


def _prepare(source, out, **options):
    return prepare(str(source), out, fields=GROUPED, min_class_count=5, progress=False, **options)


def test_worker_processes_give_the_same_files_as_one(tmp_path, source, monkeypatch):
    path, _ = source
    monkeypatch.setattr(split, "CHECK_CHUNK", 8)  # several chunks, so the worker pool starts
    _prepare(path, tmp_path / "one", workers=1)
    _prepare(path, tmp_path / "two", workers=2)
    for name in ("split.json", "ids.parquet", "rejected.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not (tmp_path / "two" / split.CHECKPOINTS).exists()  # checkpoints go once the outputs are written


def test_an_interrupted_prepare_resumes_without_checking_images_again(tmp_path, source, monkeypatch):
    path, _ = source
    out = tmp_path / "out"
    _prepare(path, out)  # an earlier, complete prepare of the same folder
    monkeypatch.setattr(split, "CHECK_CHUNK", 8)
    checked: list[str] = []
    real = images.check_files

    def interrupted_after_three_chunks(paths, decode=True):
        if len(checked) == 3 * 8:
            raise KeyboardInterrupt
        checked.extend(paths)
        return real(paths, decode)

    monkeypatch.setattr(images, "check_files", interrupted_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        _prepare(path, out, seed=1, workers=1)
    # Validation ran before the old manifest went: the folder still holds the complete earlier prepare.
    assert read_manifest(out)["seed"] == 0
    assert len(list((out / split.CHECKPOINTS).rglob("*.json"))) == 3

    checked.clear()
    monkeypatch.setattr(images, "check_files", lambda paths, decode=True: checked.extend(paths) or real(paths, decode))
    _prepare(path, out, seed=1, workers=1)
    assert len(checked) == 44 - 3 * 8  # only the chunks not checkpointed
    _prepare(path, tmp_path / "fresh", seed=1, workers=1)
    for name in ("split.json", "ids.parquet", "rejected.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()

    # A kill between writing the new ids and the new split.json: no manifest is taken for complete.
    monkeypatch.setattr(split, "write_json_atomic", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _prepare(path, out, seed=2, workers=1)
    assert (out / "ids.parquet").is_file() and not (out / "split.json").exists()
    with pytest.raises(ClipmedError, match="no split.json"):
        load_prepared(out)


def test_a_manifest_that_does_not_match_its_ids_is_refused(tmp_path, source):
    path, _ = source
    _prepare(path, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    for broken in ({**manifest, "complete": False}, {**manifest, "ids": {**manifest["ids"], "sha256": "0" * 64}}):
        (tmp_path / "out" / "split.json").write_text(json.dumps(broken))
        with pytest.raises(ClipmedError, match="unfinished or interrupted prepare.*run `clipmed prepare` again"):
            load_prepared(tmp_path / "out")


def test_parquet_manifest_round_trip_and_format_1_manifests_still_load(tmp_path, source):
    import pyarrow.parquet as pq

    path, _ = source
    _prepare(path, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "split.json").read_text())
    assert raw["format_version"] == 2 and "splits" not in raw and raw["ids"]["file"] == "ids.parquet"
    table = pq.read_table(tmp_path / "out" / "ids.parquet")
    manifest = read_manifest(tmp_path / "out")
    lists = {**manifest["splits"], "text_only": manifest["text_only"], "image_only": manifest["image_only"]}
    assert table.num_rows == sum(len(ids) for ids in lists.values())
    assert lists["text_only"] == ["id0005"] and all(ids == sorted(ids) for ids in lists.values())
    prepared = load_prepared(tmp_path / "out")
    assert [r.id for r in prepared.records("test")] == manifest["splits"]["test"]

    # The same split as clipmed wrote it before the Parquet manifest (format 1: ids inline, no policies).
    old = {key: value for key, value in raw.items() if key not in ("ids", "complete", "labels", "allow_outside_paths")}
    old.update(format_version=1, splits=manifest["splits"], text_only=lists["text_only"], image_only=[])
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "split.json").write_text(json.dumps(old))
    legacy = load_prepared(tmp_path / "out")
    assert legacy.manifest["splits"] == manifest["splits"]
    assert [(r.id, r.label) for r in legacy.records("train")] == [(r.id, r.label) for r in prepared.records("train")]


def test_prepare_locks_its_output_folder(tmp_path, source, monkeypatch):
    path, _ = source
    out = tmp_path / "out"
    monkeypatch.setattr("clipmed.locking._pid_alive", lambda pid: True)
    out.mkdir()
    (out / ".clipmed.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 1,
                                                    "what": "prepare", "since": 0}))
    with pytest.raises(ClipmedError, match="locked by process 1 on this host \\(prepare\\)"):
        _prepare(path, out)
    (out / ".clipmed.lock").unlink()
    with FileLock(out, what="prepare"):  # re-entrant for the process that holds it
        _prepare(path, out)
    assert (out / "split.json").is_file() and not (out / ".clipmed.lock").exists()


def test_webdataset_source_prepares_and_counts_a_corrupt_member(tmp_path, kit):
    rows = kit.rows(tmp_path, {"A": 12, "B": 12}, group_size=2)
    image = tmp_path / rows[3]["file_name"]
    image.write_bytes(image.read_bytes()[:40])
    pattern = kit.write("webdataset", tmp_path, rows)
    summary = prepare(pattern, tmp_path / "out", min_class_count=5, progress=False)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"id": "id0003", "locator": "shard-00000.tar:sampleid0003",
                         "reason": "not an image (kept as a text-only row)", "uses": "text-only"}]
    assert summary["counts"]["rejected_total"] == 1 and summary["counts"]["usable"] == 23
    prepared = load_prepared(tmp_path / "out")
    assert prepared.manifest["source"] == {"format": "webdataset", "path": pattern, "image_root": None,
                                           "fingerprint": prepared.source.fingerprint, "streaming": False}
    assert [r.id for r in prepared.text_only_records()] == ["id0003"]


def test_label_case_variants_merge_and_the_policy_is_recorded(tmp_path, kit):
    rows = kit.rows(tmp_path / "src", {"Chest": 8, "chest ": 3, "CHEST": 2, "Spine": 9, "Dental": 2})
    path = kit.write("imagefolder", tmp_path / "src", rows)
    summary = prepare(path, tmp_path / "out", min_class_count=5, progress=False)
    assert summary["classes"] == ["Chest", "Spine"] and summary["counts"]["labeled"] == 22
    assert summary["label_merges"] == {"Chest": ["CHEST", "chest"]}
    assert any("merged label spellings 'CHEST', 'chest' into 'Chest'" in w for w in summary["warnings"])
    prepared = load_prepared(tmp_path / "out")
    assert prepared.manifest["labels"] == {"case_sensitive": False, "merged": {"CHEST": "Chest", "chest": "Chest"}}
    assert prepared.record("id0008").label == prepared.record("id0011").label == "Chest"
    dropped = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [entry["id"] for entry in dropped] == ["id0022", "id0023"]
    assert dropped[0]["reason"] == ("label 'Dental' has 2 usable rows, under --min-class-count 5 "
                                    "(kept as an unlabeled row)")

    exact = prepare(path, tmp_path / "exact", min_class_count=3, case_sensitive_labels=True, progress=False)
    assert exact["classes"] == ["Chest", "Spine", "chest"] and not exact["label_merges"]
    assert load_prepared(tmp_path / "exact").manifest["labels"]["case_sensitive"] is True

    # A format-1 manifest (no label policy) keeps its exact, stripped labels.
    manifest = read_manifest(tmp_path / "exact")
    legacy = {key: value for key, value in manifest.items() if key not in ("ids", "complete", "labels")}
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "split.json").write_text(json.dumps(dict(legacy, format_version=1)))
    legacy = load_prepared(tmp_path / "legacy")
    assert legacy.record("id0008").label == "chest" and legacy.record("id0011").label is None
