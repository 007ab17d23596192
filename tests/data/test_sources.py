"""Each loader reads the same rows into the same Records; missing fields and bad rows are reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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


def test_imagefolder_locators_and_bad_json_line(tmp_path, kit, rows):
    path = kit.write("imagefolder", tmp_path, rows)
    assert load_source(path).locators[2] == "metadata.jsonl:3"
    with open(tmp_path / "metadata.jsonl", "a") as handle:
        handle.write('{"file_name": "x.png", oops\n')
    with pytest.raises(ClipmedError, match=r"metadata\.jsonl:5: not valid JSON .*fix or delete that line"):
        load_source(path)


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
    assert cached.parent == tmp_path / "clipmed-cache" / "hf-images" / loaded.fingerprint
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
