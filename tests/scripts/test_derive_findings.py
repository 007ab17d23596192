"""scripts/derive_findings.py: the multilabel findings datasets README's benchmark suite is built from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from clipmed.data.split import prepare, read_manifest
from helpers import write_synthetic_imagefolder

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "derive_findings.py"


def _script():
    spec = importlib.util.spec_from_file_location("derive_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_out_splits_of_a_prepared_folder_get_their_present_findings(tmp_path):
    data = write_synthetic_imagefolder(tmp_path / "data", per_class=8, unlabeled=0)
    prepare(str(data), tmp_path / "prepared", min_class_count=2, progress=False)
    splits = read_manifest(tmp_path / "prepared")["splits"]

    counts = _script().derive(str(data), tmp_path / "suite", prepared=tmp_path / "prepared")

    captions = {row["id"]: row["caption"] for row in _rows(data / "metadata.jsonl")}
    for name in ("test", "val"):
        rows = _rows(tmp_path / "suite" / name / "metadata.jsonl")
        assert [row["id"] for row in rows] == splits[name]  # only the held-out rows, in the split's order
        for row in rows:
            assert (tmp_path / "data" / row["file_name"]).is_file()  # images referenced in place
            assert ("fracture" in row["findings"]) == ("a fracture" in captions[row["id"]])
            assert not any("acute" in finding for finding in row["findings"])  # "no acute findings" is negated
        assert sum(counts[str(tmp_path / "suite" / name)].values()) == sum(len(r["findings"]) for r in rows)
