"""prepare on the real roco-radiology dev set (skipped where the shared data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipmed.data.records import FieldMap
from clipmed.data.split import load_prepared, prepare

ROCO = Path(__file__).parents[2].parent / "shared/datasets/roco-radiology"


@pytest.mark.skipif(not (ROCO / "metadata.jsonl").is_file(), reason=f"{ROCO} is not here")
def test_prepare_roco_radiology(tmp_path):
    summary = prepare(str(ROCO), tmp_path, fields=FieldMap(label_field="body_part", group_field="article"),
                      progress=False)
    counts = summary["counts"]
    assert summary["classes"] == ["Abdomen", "Chest", "Dental", "Extremity", "Head and Neck", "Pelvis", "Spine"]
    assert counts["rows"] == 2626 and counts["labeled"] + counts["unlabeled"] + counts["rejected_total"] == 2626
    assert counts["rejected_total"] < 30 and counts["unlabeled"] >= 1100
    sizes = summary["sizes"]
    assert 140 <= sizes["val"] <= 160 and 140 <= sizes["test"] <= 160
    assert all(count >= 5 for split in ("val", "test") for count in counts[split].values())
    assert max(counts["train"].values()) == counts["train_cap"]
    assert sizes["pool"] + sizes["val"] + sizes["test"] + counts["held_out_by_group"] == counts["usable"]
    prepared = load_prepared(tmp_path)
    assert all(record.extra["license"] for record in prepared.records("test"))
