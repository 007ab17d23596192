"""No bad row can crash training or evaluation: an image that becomes unreadable after `prepare` (deleted,
truncated, overwritten) is skipped and counted, and the run completes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipmed import cli
from clipmed.data.records import FieldMap
from clipmed.data.split import load_prepared, prepare, read_manifest
from helpers import write_synthetic_imagefolder
from reliability_helpers import single_thread, train_options


@pytest.fixture
def damaged(tmp_path) -> Path:
    """A prepared dataset, then one image each of train, val and test made unreadable three different ways."""
    root = write_synthetic_imagefolder(tmp_path / "data", per_class=16, unlabeled=6, seed=2)
    out = tmp_path / "prepared"
    prepare(str(root), out, fields=FieldMap(group_field="article"), min_class_count=5, seed=0, progress=False)
    prepared = load_prepared(out)
    train, val, test = (prepared.records(name)[0].image_path for name in ("train", "val", "test"))
    data = Path(train).read_bytes()
    Path(train).write_bytes(data[: len(data) // 2])  # truncated
    Path(val).unlink()  # deleted
    Path(test).write_text("not an image any more")  # overwritten
    return out


def test_training_and_evaluation_skip_and_count_unreadable_images(damaged, tiny_dual_folder, tmp_path):
    manifest = read_manifest(damaged)
    prepared = load_prepared(damaged)
    bad_train, bad_val, bad_test = (prepared.records(name)[0].id for name in ("train", "val", "test"))
    run = tmp_path / "run"
    options = train_options(epochs=1)
    with single_thread():
        assert cli.main(["train", "--data", str(damaged), "--model", str(tiny_dual_folder), "--out", str(run),
                         *options]) == 0
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "done" and (run / "model" / "model.safetensors").is_file()
        # Skipped and counted, with the reason: {row id: reason}.
        assert sorted(info["unreadable_images"]) == sorted([bad_train, bad_val])
        assert info["unreadable_images"][bad_train].startswith("truncated or corrupt image")
        assert info["unreadable_images"][bad_val] == "missing file"
        assert info["n_training_rows"] == len(manifest["splits"]["pool"]) - 1

        out = tmp_path / "eval.json"
        assert cli.main(["evaluate", "--model", str(run), "--data", str(damaged), "--precision", "fp32",
                         "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == len(manifest["splits"]["test"]) - 1
    assert result["unreadable_images"] == {bad_test: "not an image"}
