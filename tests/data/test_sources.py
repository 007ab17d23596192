"""Each loader reads the same rows into the same Records; missing fields and bad rows are reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipmed.cache import cache_dir
from clipmed.data.records import FieldMap
from clipmed.data.sources import FORMATS, detect_format, load_source
from clipmed.errors import ClipmedError

GROUPED = FieldMap(group_field="article")


@pytest.fixture
def rows(tmp_path, kit):
    rows = kit.rows(tmp_path, {"Chest": 3, None: 1}, group_size=2)
    rows[1]["caption"] = None  # a null value still makes a Record
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_records(tmp_path, kit, rows, fmt):
    path = kit.write(fmt, tmp_path, rows)
    image_root = str(tmp_path) if fmt == "pubmedvision" else None
    loaded = load_source(path, fields=GROUPED, image_root=image_root)
    assert loaded.format == fmt and detect_format(path) == fmt
    assert not loaded.problems and len(loaded.locators) == len(loaded.records)
    assert [r.id for r in loaded.records] == [row["id"] for row in rows]
    assert [r.label or None for r in loaded.records] == [row["body_part"] for row in rows]  # CSV: ""
    assert [r.group for r in loaded.records] == [row["article"] for row in rows]
    captions = [r.caption for r in loaded.records]
    assert captions[0] == "figure 0 of Chest" and captions[1] in (None, "")  # CSV has no null
    for record, row in zip(loaded.records, rows):
        assert os.path.isabs(record.image_path)
        assert Path(record.image_path).read_bytes() == (tmp_path / row["file_name"]).read_bytes()
        assert record.extra["source"] == row["source"] and record.extra["license"] == "CC BY"
        assert "caption" not in record.extra and "id" not in record.extra
    assert len(loaded.fingerprint) == 64


def test_imagefolder_locators_and_bad_lines_are_problem_rows(tmp_path, kit, rows):
    path = kit.write("imagefolder", tmp_path, rows)
    assert load_source(path).locators[2] == "metadata.jsonl:3"
    with open(tmp_path / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "x.png", oops\n')
        handle.write(b'{"file_name": "y.png", "caption": "caf\xe9", "id": "latin1"}\n')
        handle.write(json.dumps(dict(rows[0], id="after")).encode() + b"\n")
    loaded = load_source(path)
    assert [r.id for r in loaded.records][-1] == "after" and len(loaded.records) == 5
    assert loaded.problems == [
        ("metadata.jsonl:5", "not valid JSON (Expecting property name enclosed in double quotes)"),
        ("metadata.jsonl:6", "not UTF-8 text (byte 0xe9 at column 39); save metadata.jsonl as UTF-8")]


def test_an_image_path_with_a_lone_surrogate_escape_is_a_problem_row(tmp_path, kit, rows):
    """JSON may spell a lone surrogate ("\\ud800"): no file has that name and UTF-8 cannot write it back out
    (it crashed prepare's checkpoint writer), so the row is bad, not fatal."""
    path = kit.write("imagefolder", tmp_path, rows)
    with open(tmp_path / "metadata.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"file_name": "\\ud800", "caption": "a figure", "id": "surrogate"}\n')
    loaded = load_source(path)
    assert "surrogate" not in [r.id for r in loaded.records]
    assert loaded.problems == [(f"metadata.jsonl:{len(rows) + 1}", "image path is not valid Unicode")]


def test_csv_rows_with_bytes_that_are_not_utf8_are_problem_rows(tmp_path, kit, rows):
    path = Path(kit.write("csv", tmp_path, rows))
    with open(path, "ab") as handle:
        handle.write(b"images/img_0000.png,caf\xe9 latin-1,x9,Chest,PMC9,src,CC BY\n")
    loaded = load_source(str(path))
    assert loaded.problems == [("data.csv:6", "not UTF-8 text; save data.csv as UTF-8")]
    assert len(loaded.records) == 4
    path.write_bytes(b"filepath,t\xe9tle\n")
    with pytest.raises(ClipmedError, match=r"data\.csv:1: the header line is not UTF-8"):
        load_source(str(path))


def test_missing_field_error_names_file_field_fields_and_option(tmp_path, kit, rows):
    path = kit.write("imagefolder", tmp_path, rows)
    with pytest.raises(ClipmedError) as info:
        load_source(path, fields=FieldMap(caption_field="text"))
    message = str(info.value)
    assert "metadata.jsonl" in message and "'text'" in message and "--caption-field" in message
    assert "body_part, caption, file_name" in message
    with pytest.raises(ClipmedError, match="--label-field"):
        load_source(path, fields=FieldMap(label_field="organ"))
    with pytest.raises(ClipmedError, match="--group-field"):
        load_source(path, fields=FieldMap(group_field="paper"))
    with pytest.raises(ClipmedError, match="--image-field"):
        load_source(kit.write("csv", tmp_path, rows), fields=FieldMap(image_field="img"))


def test_rows_without_ids_get_stable_index_ids_and_unparseable_rows_are_problems(tmp_path, kit, rows):
    for row in rows:
        del row["id"]
    lines = [json.dumps(row) for row in rows] + ["[1, 2]", json.dumps(dict(rows[0], caption=["a"]))]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    loaded = load_source(str(tmp_path))
    assert [r.id for r in loaded.records] == ["row-0", "row-1", "row-2", "row-3"]
    assert loaded.problems == [("metadata.jsonl:5", "row is not an object"),
                               ("metadata.jsonl:6", "caption is a list, not text")]


def test_metadata_file_path_and_image_root_override(tmp_path, kit, rows):
    folder = tmp_path / "meta"
    kit.write("imagefolder", folder, rows)
    loaded = load_source(str(folder / "metadata.jsonl"), image_root=str(tmp_path))
    assert loaded.format == "imagefolder" and loaded.image_root == str(tmp_path)
    assert loaded.records[0].image_path == str(tmp_path / rows[0]["file_name"])


def test_pubmedvision_caption_from_gpt_turn_or_a_named_field(tmp_path, kit, rows):
    path = Path(kit.write("pubmedvision", tmp_path, rows))
    data = json.loads(path.read_text())
    data[0]["image"].append("images/other.png")  # the first image is the one used
    data[0]["conversations"].insert(0, {"from": "gpt", "value": "first gpt turn"})
    data[2]["summary"] = "a real top-level caption"
    path.write_text(json.dumps(data))
    loaded = load_source(str(path), image_root=str(tmp_path))
    assert loaded.records[0].caption == "first gpt turn"
    assert loaded.records[0].image_path == str(tmp_path / rows[0]["file_name"])
    assert loaded.records[0].extra["modality"] == "CT"
    assert loaded.locators[0] == "pubmedvision.json[0]"
    named = load_source(str(path), image_root=str(tmp_path), fields=FieldMap(caption_field="summary"))
    assert named.records[2].caption == "a real top-level caption" and named.records[0].caption is None
    # Without --image-root the paths are relative to the JSON's folder, here the same folder.
    assert load_source(str(path)).records[0].image_path == str(tmp_path / rows[0]["file_name"])


def test_pubmedvision_needs_a_list_and_conversations(tmp_path):
    path = tmp_path / "pmv.json"
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(ClipmedError, match="expected a JSON list"):
        load_source(str(path))
    path.write_text(json.dumps([{"id": "1", "image": ["a.png"], "body_part": "Chest"}]))
    with pytest.raises(ClipmedError, match="no field 'caption' for the caption.*--caption-field"):
        load_source(str(path))


def test_csv_tsv_and_named_columns(tmp_path, kit, rows):
    tsv = load_source(kit.writers["csv"](tmp_path, rows, delimiter="\t"))
    assert tsv.format == "csv" and tsv.records[0].caption == "figure 0 of Chest"
    assert tsv.locators[0] == "data.tsv:2"
    path = tmp_path / "named.csv"
    path.write_text("img,text,label\nimages/img_0000.png,hello,Chest\n")
    loaded = load_source(str(path), fields=FieldMap(image_field="img", caption_field="text",
                                                    label_field="label"))
    assert loaded.records[0].caption == "hello" and loaded.records[0].label == "Chest"
    assert loaded.records[0].id == "row-0"


def test_csv_row_with_too_many_fields_is_a_problem(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('filepath,title,body_part\na.png,"two\nlines",Chest\nb.png,x,Chest,extra\n')
    loaded = load_source(str(path))
    assert loaded.records[0].caption == "two\nlines"
    assert loaded.problems == [("d.csv:4", "4 fields but the header has 3")]


def test_hf_embedded_images_are_materialised_once(tmp_path, kit, rows):
    path = kit.write("hf", tmp_path, rows)
    loaded = load_source(path)
    cached = Path(loaded.records[0].image_path)
    assert cached.parent == cache_dir("hf-images", loaded.fingerprint)
    assert cached.parent.parent == tmp_path / "clipmed-cache" / "hf-images"
    assert cached.name == "id0000.png"
    stamp = cached.stat().st_mtime_ns
    again = load_source(path)
    assert again.records[0].image_path == str(cached) and cached.stat().st_mtime_ns == stamp
    assert again.fingerprint == loaded.fingerprint and loaded.path == os.path.abspath(path)


def test_hf_image_paths_are_used_when_they_exist(tmp_path, kit, rows):
    path = kit.write("hf", tmp_path, rows)
    loaded = load_source(path, image_root=str(tmp_path / "images"))  # where the stored base names exist
    assert loaded.records[0].image_path == str(tmp_path / rows[0]["file_name"])
    assert not (tmp_path / "clipmed-cache").exists()


def test_hf_string_column_and_dataset_dict_splits(tmp_path, kit, rows):
    import datasets

    table = {"file_name": [row["file_name"] for row in rows], "caption": ["c"] * len(rows),
             "body_part": ["Chest"] * len(rows)}
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                          "test": datasets.Dataset.from_dict(table).select([0])}).save_to_disk(str(folder))
    train = load_source(str(folder), image_root=str(tmp_path))
    assert train.format == "hf" and train.path == f"{folder}:train" and len(train.records) == 4
    assert train.records[0].image_path == str(tmp_path / rows[0]["file_name"])
    test = load_source(f"{folder}:test", image_root=str(tmp_path))
    assert len(test.records) == 1 and test.path == f"{folder}:test"
    with pytest.raises(ClipmedError, match="splits: train, test"):
        load_source(f"{folder}:validation")


def test_format_detection(tmp_path):
    assert detect_format("hf:owner/name") == "hf"
    assert detect_format("owner/name:validation") == "hf"
    with pytest.raises(ClipmedError, match="no such file"):
        detect_format(str(tmp_path / "missing" / "x.csv"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ClipmedError, match="--format"):
        detect_format(str(tmp_path / "notes.txt"))
    with pytest.raises(ClipmedError, match="--format"):
        detect_format(str(tmp_path))
    with pytest.raises(ClipmedError, match="unknown dataset format"):
        load_source(str(tmp_path), fmt="parquet")


def test_webdataset_shards_brace_expanded_with_ids_keys_and_unreadable_parts(tmp_path, kit, rows, monkeypatch):
    import tarfile
    from io import BytesIO

    pattern = kit.write("webdataset", tmp_path, rows)
    assert pattern.endswith("shard-{00000..00001}.tar") and detect_format(pattern) == "webdataset"
    with tarfile.open(tmp_path / "shard-00002.tar", "w") as tar:  # a key needing sanitising, no json id
        for name, data in (("dir/odd key:1.png", (tmp_path / rows[0]["file_name"]).read_bytes()),
                           ("dir/odd key:1.txt", b"a caption"), ("dir/odd key:1.json", b'{"body_part": "Chest"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
    (tmp_path / "shard-00003.tar").write_bytes((tmp_path / "shard-00000.tar").read_bytes()[:700])  # cut short
    monkeypatch.chdir(tmp_path)  # shard paths relative to the working directory
    loaded = load_source("shard-{00000..00003}.tar")
    assert loaded.path == str(tmp_path / "shard-{00000..00003}.tar")  # absolute: later steps may run elsewhere
    assert [r.id for r in loaded.records] == [row["id"] for row in rows] + ["dir/odd key:1"]
    assert loaded.locators[0] == "shard-00000.tar:sampleid0000"
    odd = loaded.records[4]
    assert odd.caption == "a caption" and odd.label == "Chest"
    folder = cache_dir("wds-images", loaded.fingerprint)
    assert Path(odd.image_path).parent == folder and ":" not in Path(odd.image_path).name
    assert " " not in Path(odd.image_path).name and Path(odd.image_path).suffix == ".png"
    assert Path(loaded.records[0].image_path).read_bytes() == (tmp_path / rows[0]["file_name"]).read_bytes()
    assert loaded.records[1].caption is None and loaded.records[0].extra["license"] == "CC BY"
    assert [(locator, reason.split(":")[0]) for locator, reason in loaded.problems] == [
        ("shard-00003.tar", "unreadable tar data")]  # cut inside its first member
    with pytest.raises(ClipmedError, match="1 of 2 shards are not files"):
        load_source("shard-{00000,00009}.tar")


def test_pubmedvision_is_parsed_incrementally(tmp_path, kit, rows, monkeypatch):
    path = Path(kit.write("pubmedvision", tmp_path, rows))

    def no_json_load(*_args, **_kwargs):
        raise AssertionError("PubMedVision's JSON must not be read whole")

    monkeypatch.setattr(json, "load", no_json_load)
    monkeypatch.setattr(json, "loads", no_json_load)
    loaded = load_source(str(path))
    assert [r.id for r in loaded.records] == [row["id"] for row in rows]
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ClipmedError, match=r"pubmedvision\.json: not valid JSON after record 2"):
        load_source(str(path)).records


def test_hf_streaming_from_local_parquet_files(tmp_path, kit, rows):
    import datasets

    records = [{k: v for k, v in row.items() if k != "file_name"}
               | {"image": {"bytes": (tmp_path / row["file_name"]).read_bytes(), "path": f"{row['id']}.png"}}
               for row in rows]
    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in records[0]
                                                                if k != "image"}})
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_list(records, features=features).to_parquet(str(folder / "train-00000.parquet"))
    loaded = load_source(str(folder), fmt="hf", streaming=True)
    assert loaded.streaming and loaded.path == f"{folder}:train"
    assert [r.id for r in loaded.records] == [row["id"] for row in rows]
    cached = Path(loaded.records[0].image_path)
    assert cached.parent == cache_dir("hf-images", loaded.fingerprint)
    assert cached.read_bytes() == (tmp_path / rows[0]["file_name"]).read_bytes()
    assert load_source(str(folder), fmt="hf", streaming=True).fingerprint == loaded.fingerprint
    with pytest.raises(ClipmedError, match="drop --streaming"):
        load_source(kit.write("csv", tmp_path, rows), streaming=True)


def test_image_paths_outside_the_dataset_folder_are_refused_unless_allowed(tmp_path, kit, rows):
    outside = kit.save_image(tmp_path / "outside" / "x.png")
    root = tmp_path / "data"
    rows = kit.rows(root, {"Chest": 3})
    rows[0]["file_name"] = "../outside/x.png"
    rows[1]["file_name"] = str(outside)
    (root / "images" / "link.png").symlink_to(outside)
    (root / "images" / "inner.png").symlink_to(root / "images" / "img_0002.png")
    rows.append(dict(rows[2], id="link", file_name="images/link.png"))
    rows.append(dict(rows[2], id="inner", file_name="images/inner.png"))
    path = kit.write("imagefolder", root, rows)
    loaded = load_source(path)
    refused = {r.id: r.image_fault for r in loaded.records if r.image_fault}
    assert sorted(refused) == ["id0000", "id0001", "link"]
    assert all(r.image_path is None for r in loaded.records if r.image_fault)
    assert refused["id0000"].startswith(f"image path outside the dataset folder: {outside}")
    assert "--allow-outside-paths" in refused["link"]
    assert {r.id: r.image_path for r in loaded.records}["inner"] == str(root / "images" / "inner.png")
    # --image-root widens what is inside; --allow-outside-paths accepts everything.
    assert not any(r.image_fault for r in load_source(path, image_root=str(tmp_path)).records[1:])
    allowed = load_source(path, allow_outside_paths=True)
    assert not any(r.image_fault for r in allowed.records) and allowed.records[1].image_path == str(outside)
