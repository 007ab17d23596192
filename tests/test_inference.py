"""predict, embed, index and search: the library functions against brute force, and their thin CLI commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clipmed import inference
from clipmed.cli import main
from clipmed.data import datasets
from clipmed.data.datasets import loader
from clipmed.data.records import FieldMap, Record
from clipmed.data.sources import load_source
from clipmed.evaluation.embed import embed_images, embed_texts
from clipmed.evaluation.zeroshot import class_embeddings
from clipmed.inference import label_probabilities, model_fingerprint, top_k
from clipmed.models import load_model
from helpers import write_synthetic_imagefolder

LABELS = ["Chest", "Abdomen", "Head"]


def _records(paths: list[str]) -> list[Record]:
    return [Record(id=p, image_path=p, caption=None) for p in paths]


def _no_labels() -> FieldMap:
    return FieldMap(label_field=None)


def test_label_probabilities_are_a_softmax_of_scaled_cosines():
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    probabilities = label_probabilities(images, classes, 20.0)
    logits = 20.0 * images @ classes.t()
    assert torch.allclose(probabilities, logits.exp() / logits.exp().sum(dim=1, keepdim=True), atol=1e-6)


def test_top_k_orders_by_score_and_breaks_ties_by_row():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    assert top_k(embeddings, np.array([1.0, 0.0], dtype=np.float32), 3) == [(0, 1.0), (2, 1.0), (3, pytest.approx(0.6))]


def test_predict_gives_top_k_probabilities_as_json_and_table(tiny_dual_folder, synthetic_dataset, capsys):
    images = [str(synthetic_dataset / "images" / f"img_{i:04d}.png") for i in range(2)]
    args = ["predict", "--model", str(tiny_dual_folder), *images, "--labels", ",".join(LABELS), "--top-k", "2",
            "--precision", "fp32"]
    assert main([*args, "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    model = load_model(str(tiny_dual_folder))
    expected = label_probabilities(embed_images(model, _records(images), precision="fp32"),
                                   class_embeddings(model, LABELS, ["A medical image of {label}"], precision="fp32"),
                                   model.scale().item())
    for prediction, row in zip(predictions, expected):
        assert prediction["image"] in images and len(prediction["labels"]) == 2
        best = row.argsort(descending=True)[:2]
        assert prediction["labels"] == [LABELS[i] for i in best.tolist()]
        assert prediction["probabilities"] == pytest.approx(row[best].tolist(), abs=1e-5)
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["label", "probability", "image"] and len(table) == 1 + 2 * 2
    assert table[1].endswith(images[0]) and table[1].split()[0] == predictions[0]["labels"][0]


def test_predict_errors_name_the_problem(tiny_dual_folder, synthetic_dataset, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    assert main(["predict", "--model", str(tiny_dual_folder), str(broken), "--labels", "A,B"]) == 2
    assert "not an image" in capsys.readouterr().err
    image = str(synthetic_dataset / "images" / "img_0000.png")
    assert main(["predict", "--model", str(tiny_dual_folder), image, "--labels", "A,B", "--template", "x"]) == 2
    assert "{label}" in capsys.readouterr().err


def test_predict_with_templates_uses_their_prompt_ensemble(tiny_dual_folder, synthetic_dataset, tmp_path, capsys):
    ensemble = ["A radiograph of the {label}", "A scan of the {label} region"]
    templates = tmp_path / "prompts.yaml"
    templates.write_text("default:\n" + "".join(f'  - "{t}"\n' for t in ensemble))
    images = [str(synthetic_dataset / "images" / f"img_{i:04d}.png") for i in range(2)]
    args = ["predict", "--model", str(tiny_dual_folder), *images, "--labels", ",".join(LABELS), "--top-k", "3",
            "--precision", "fp32", "--json"]
    assert main([*args, "--templates", str(templates)]) == 0
    predictions = json.loads(capsys.readouterr().out)
    model = load_model(str(tiny_dual_folder))
    expected = label_probabilities(embed_images(model, _records(images), precision="fp32"),
                                   class_embeddings(model, LABELS, ensemble, precision="fp32"), model.scale().item())
    for prediction, row in zip(predictions, expected):
        assert prediction["probabilities"] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-5)
        assert prediction["labels"] == [LABELS[i] for i in row.argsort(descending=True).tolist()]
    assert main([*args, "--templates", str(tmp_path / "missing.yaml")]) == 2
    assert "prompt template file not found" in capsys.readouterr().err
    assert main([*args, "--templates", str(templates), "--template", "X {label}"]) == 2
    assert "not both" in capsys.readouterr().err


def _dataset_with_bad_rows(root):
    """7 good rows, plus an unreadable image, a missing image and a row without a caption."""
    write_synthetic_imagefolder(root, per_class=2, unlabeled=1)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG truncated")
    rows = [{"id": "broken", "file_name": "images/broken.png", "caption": "a broken file"},
            {"id": "missing", "file_name": "images/nowhere.png", "caption": "a missing file"},
            {"id": "nocaption", "file_name": "images/img_0000.png", "caption": None}]
    with open(root / "metadata.jsonl", "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return root


def test_embed_writes_parquet_and_skips_unreadable_images(tiny_hf, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _dataset_with_bad_rows(tmp_path / "data")
    out = tmp_path / "embeddings.parquet"
    assert main(["embed", "--model", str(tiny_hf), "--data", str(data), "--out", str(out), "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "skipped broken: not an image" in captured.err
    assert "skipped missing: missing file" in captured.err
    assert "8 image and 9 text embeddings" in captured.out and "2 rows without a readable image" in captured.out
    table = pq.read_table(out)
    assert table.schema.field("id").type == pa.string() and table.schema.field("kind").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    images = [r for r in rows if r["kind"] == "image"]
    assert {r["id"] for r in images} == {f"row{i:04d}" for i in range(7)} | {"nocaption"}
    assert len([r for r in rows if r["kind"] == "text"]) == 9
    model = load_model(str(tiny_hf))
    record = next(r for r in load_source(str(data), fields=_no_labels()).records if r.id == "row0003")
    expected = embed_images(model, [record], precision="fp32")[0]
    assert np.allclose(next(r["embedding"] for r in images if r["id"] == "row0003"), expected.numpy(), atol=1e-6)

    assert main(["embed", "--model", str(tiny_hf), "--data", str(data), "--out", str(out), "--what", "texts"]) == 0
    assert set(pq.read_table(out).column("kind").to_pylist()) == {"text"}


def test_embed_streams_row_groups_that_hold_what_one_chunk_would(tiny_hf, tmp_path, monkeypatch):
    """Chunks of 3 rows (row groups, memory bounded) write the same rows, in order, as one chunk of everything."""
    import pyarrow.parquet as pq

    data = _dataset_with_bad_rows(tmp_path / "data")
    whole, chunked = tmp_path / "whole.parquet", tmp_path / "chunked.parquet"
    command = ["embed", "--model", str(tiny_hf), "--data", str(data), "--precision", "fp32", "--out"]
    assert main([*command, str(whole)]) == 0
    monkeypatch.setattr(inference, "EMBED_CHUNK", 3)
    assert main([*command, str(chunked)]) == 0
    assert pq.ParquetFile(chunked).num_row_groups > 4 and pq.ParquetFile(whole).num_row_groups == 2
    a, b = pq.read_table(whole).to_pydict(), pq.read_table(chunked).to_pydict()
    assert a["id"] == b["id"] and a["kind"] == b["kind"] and a["kind"].index("text") == 8  # images first
    assert np.allclose(np.array(a["embedding"]), np.array(b["embedding"]), atol=1e-5)


def test_index_built_a_chunk_at_a_time_equals_one_built_at_once(tiny_dual_folder, synthetic_dataset, tmp_path,
                                                                monkeypatch):
    from clipmed.inference import load_index

    command = ["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--precision", "fp32",
               "--out"]
    assert main([*command, str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(inference, "EMBED_CHUNK", 3)
    loaders = []  # one loader streams the whole pass: its workers do not restart per chunk

    def counted(*args, **kwargs):
        loaders.append(args)
        return loader(*args, **kwargs)

    monkeypatch.setattr(datasets, "loader", counted)
    assert main([*command, str(tmp_path / "chunked")]) == 0
    assert len(loaders) == 1
    whole, chunked = load_index(tmp_path / "whole"), load_index(tmp_path / "chunked")
    assert chunked.meta["items"] == whole.meta["items"] and len(whole.meta["items"]) == len(whole.embeddings) > 3
    assert np.allclose(chunked.embeddings, whole.embeddings, atol=1e-6)
    assert not list((tmp_path / "chunked").glob(".*staged*"))  # no staging file left


def test_search_equals_brute_force_and_finds_an_indexed_image_first(tiny_dual_folder, synthetic_dataset, tmp_path,
                                                                       capsys):
    index = tmp_path / "index"
    assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out", str(index),
                 "--precision", "fp32"]) == 0
    assert "indexed 84 images" in capsys.readouterr().out
    meta = json.loads((index / "index.json").read_text())
    records = load_source(str(synthetic_dataset), fields=_no_labels()).records
    model = load_model(str(tiny_dual_folder))
    assert meta["model"] == str(tiny_dual_folder.resolve()) and meta["model_fingerprint"] == model_fingerprint(model)
    assert [item["id"] for item in meta["items"]] == [r.id for r in records]
    assert meta["items"][0]["attribution"]["license"] == "CC BY"
    stored = np.load(index / meta["embeddings"]["file"])
    assert stored.dtype == np.float32 and stored.shape == (len(records), 16)

    query = "Radiograph of the chest showing a fracture."
    assert main(["search", "--model", str(tiny_dual_folder), "--index", str(index), query, "--top-k", "5",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    scores = (embed_images(model, records, precision="fp32") @ embed_texts(model, [query], precision="fp32").t())[:, 0]
    best = scores.argsort(descending=True, stable=True)[:5].tolist()
    assert [h["id"] for h in hits] == [records[i].id for i in best]
    assert [h["score"] for h in hits] == pytest.approx(scores[best].tolist(), abs=1e-5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]

    target = records[7]
    assert main(["search", "--model", str(tiny_dual_folder), "--index", str(index), "--image", target.image_path]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[:3] == ["1", "1.000", target.id]


def test_search_refuses_an_index_built_with_another_model(tiny_dual_folder, tiny_hf, synthetic_dataset, tmp_path,
                                                          capsys):
    index = tmp_path / "index"
    assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out", str(index)]) == 0
    assert main(["search", "--model", str(tiny_hf), "--index", str(index), "chest"]) == 2
    assert "was built with model" in capsys.readouterr().err
    moved = shutil.copytree(tiny_dual_folder, tmp_path / "moved")  # the same weights elsewhere are the same model
    assert main(["search", "--model", str(moved), "--index", str(index), "chest"]) == 0
    assert main(["search", "--model", str(moved), "--index", str(tmp_path), "chest"]) == 2
    assert "not an index folder" in capsys.readouterr().err


def test_a_rebuild_killed_before_its_commit_leaves_the_old_index_working(tiny_dual_folder, synthetic_dataset,
                                                                         tmp_path, monkeypatch, capsys):
    from clipmed import inference
    from helpers import tiny_dual

    index = tmp_path / "index"
    assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out", str(index),
                 "--precision", "fp32"]) == 0
    other = tmp_path / "other"
    tiny_dual(seed=1).save(other)

    def killed(*args, **kwargs):  # the process dies after the new embeddings are on disk, before index.json
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "write_index_json", killed)
    assert main(["index", "--model", str(other), "--data", str(synthetic_dataset), "--out", str(index),
                 "--precision", "fp32"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    target = str(synthetic_dataset / "images" / "img_0007.png")
    assert main(["search", "--model", str(tiny_dual_folder), "--index", str(index), "--image", target]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["1", "1.000", "row0007"]
    # The next rebuild commits and removes the embeddings the killed one left behind.
    assert main(["index", "--model", str(other), "--data", str(synthetic_dataset), "--out", str(index)]) == 0
    assert [p.name for p in index.glob("*.npy")] == [json.loads((index / "index.json").read_text())["embeddings"]["file"]]


def test_search_refuses_embeddings_that_do_not_belong_to_the_index(tiny_dual_folder, synthetic_dataset, tmp_path,
                                                                   capsys):
    index = tmp_path / "index"
    assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out", str(index)]) == 0
    stored = index / json.loads((index / "index.json").read_text())["embeddings"]["file"]
    embeddings = np.load(stored)
    np.save(stored, embeddings[::-1].copy())  # same shape, other rows: neighbours would be wrong
    capsys.readouterr()
    assert main(["search", "--model", str(tiny_dual_folder), "--index", str(index), "chest"]) == 2
    err = capsys.readouterr().err
    assert "does not match index.json" in err and "clipmed index" in err and len(err.strip().splitlines()) == 1
