"""`clipmed train --suite`: the suite is scored at every validation and logged; checkpoints are chosen by it
only when asked (`select_by_suite`)."""

from __future__ import annotations

import csv
import json

import pytest

from clipmed.errors import ClipmedError
from clipmed.training.config import TrainConfig
from clipmed.training.train import train


def _suite(tmp_path, synthetic_dataset):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  - name: synth\n    data: {synthetic_dataset}\n    label_field: body_part\n"
                     "    min_class_count: 5\n")
    return suite


def _config(prepared, model, out, **overrides) -> TrainConfig:
    return TrainConfig(data=str(prepared), model=str(model), out=str(out), objective="caption", epochs=1,
                       batch_size=8, max_steps=2, precision="fp32", seed=0, freeze_batchnorm=False, **overrides)


def test_suite_scores_are_logged_at_validation_not_used_for_selection(prepared_synthetic, synthetic_dataset,
                                                                           tiny_dual_folder, tmp_path):
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run",
                        suite=str(_suite(tmp_path, synthetic_dataset))), progress=False)
    with open(run / "validation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["step"] for row in rows} == {"2"}  # the one validation, at the end of the 2 steps
    assert {"val_mean_recall_at_1", "suite_synth", "suite_multiclass_top1", "suite_average"} <= {r["name"] for r in rows}
    saved = json.loads((run / "suite" / "step-2.json").read_text())
    assert saved["results"]["synth"]["ensemble"]["n"] == 72  # every labeled row of the synthetic set (3 x 24)
    assert "val_mean_recall_at_1" in json.loads((run / "run.json").read_text())["best"]


def test_select_by_suite_needs_a_suite(prepared_synthetic, tiny_dual_folder, tmp_path):
    with pytest.raises(ClipmedError, match="--select-by-suite needs --suite"):
        train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", select_by_suite=True), progress=False)
