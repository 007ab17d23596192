"""The markdown report: Table 1 numbers, per-class table, optional sections present only when measured."""

from __future__ import annotations

import numpy as np
import pytest

from clipmed.evaluation.metrics import retrieval_metrics
from clipmed.report.markdown import write_report


def _evaluate(top1: float, a_top1: float, b_top1: float) -> dict:
    """A hand-written evaluate JSON on 5 test rows (3 of class a, 2 of b); intervals are estimate +- 0.1."""
    values = {"top1": top1, "top3": 1.0, "macro_f1": top1 - 0.05, "balanced_accuracy": (a_top1 + b_top1) / 2}
    return {
        "n": 5,
        "classes": ["a", "b|c"],
        **values,
        "majority_rate": 0.6,
        "ci95": {key: [values[key] - 0.1, values[key] + 0.1] for key in ("top1", "top3", "macro_f1")},
        "per_class": {"a": {"n": 3, "top1": a_top1}, "b|c": {"n": 2, "top1": b_top1}},
        "confusion": {"classes": ["a", "b|c"], "matrix": [[1, 2], [0, 2]]},
    }


def _models() -> dict:
    return {"base": _evaluate(0.6, 1 / 3, 1.0), "label": _evaluate(0.8, 2 / 3, 1.0)}


def test_table1_and_per_class_numbers(tmp_path):
    path = write_report(tmp_path, {"models": _models()}, {"figures": ["per_class.png"],
                                                          "notes": {"base": "untrained projection: chance level"}})
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "| base | 60.0 [50.0, 70.0] | 100.0 [90.0, 110.0] | 55.0 [45.0, 65.0] | 66.7 |" in text
    assert "| label | 80.0 [70.0, 90.0] | 100.0 [90.0, 110.0] | 75.0 [65.0, 85.0] | 83.3 |" in text
    assert "Test split: 5 images, 2 classes. The majority class (a) is 60.0% of the test rows" in text
    assert "| a | 3 | 33.3 | 66.7 |" in text
    assert "| b\\|c | 2 | 100.0 | 100.0 |" in text  # a pipe in a class name does not break the table
    assert "![Per-class top-1 accuracy](per_class.png)" in text
    assert "- **base**: untrained projection: chance level" in text


def test_absent_sections_are_skipped(tmp_path):
    text = write_report(tmp_path, {"models": _models()}, {}).read_text()
    for absent in ("## Data", "## Prompt ensemble", "## Linear probe", "## Retrieval", "## Image embeddings",
                   "## Data efficiency", "## Run", ".png"):
        assert absent not in text
    assert "## Zero-shot classification (Table 1)" in text and "### Per class" in text


def test_extra_sections_when_measured(tmp_path):
    models = _models()
    models["label"]["ensemble"] = _evaluate(0.85, 2 / 3, 1.0)
    models["label"]["probe"] = {
        "full": {"top1": 0.9, "macro_f1": 0.88, "ci95": {"top1": [0.8, 0.95], "macro_f1": [0.78, 0.93]},
                 "n_train": 1200, "C": 0.1},
        "k_shot": {"1": {"top1_mean": 0.352, "top1_std": 0.062, "macro_f1_mean": 0.3, "macro_f1_std": 0.05,
                         "draws": 5},
                   "16": {"skipped": "class 'b|c' has only 7 train rows, fewer than k=16"}},
    }
    labels = np.array([0, 0, 1])
    models["label"]["retrieval"] = retrieval_metrics(
        np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.3, 0.6, 0.4]]), np.eye(3), image_labels=labels, text_labels=labels,
        n_boot=20)
    context = {"dataset": "roco", "dataset_path": "/data/roco", "label_field": "modality",
               "label_source": "the modality column", "model": "dual:default", "elapsed_s": 754.2,
               "counts": {"train": 1200, "test": 5, "rejected": 3, "per_class": {"a": 3, "b": 2}},
               "figures": ["per_class.png", "embeddings.png", "data_efficiency.png"], "command": "clipmed reproduce"}
    text = write_report(tmp_path, {"models": models}, context).read_text()

    assert "| label | 80.0 | 85.0 [75.0, 95.0] | +5.0 | 75.0 | 80.0 |" in text
    assert "| base |" not in text.split("## Prompt ensemble")[1].split("##")[0]  # only models that have one
    assert "| label | 1,200 | 90.0 [80.0, 95.0] | 88.0 [78.0, 93.0] | 35.2 ± 6.2 | skipped |" in text
    assert "16-shot skipped: class 'b|c' has only 7 train rows" in text
    assert "- label: mean R@1 over both directions 50.0%" in text
    assert "| label | 3 | 33.3 [" in text.split("### Image → text")[1]
    assert "| label | 3 | 66.7 [" in text.split("### Text → image")[1]
    assert "![Image embeddings (t-SNE)](embeddings.png)" in text
    assert "![Data efficiency](data_efficiency.png)" in text
    assert "- Dataset: roco (`/data/roco`)" in text
    assert "- Rows: train 1,200, test 5, rejected 3" in text and "- per class: a 3, b 2" in text
    assert "- Elapsed: 12m 34s" in text and "- Command: `clipmed reproduce`" in text


def test_contract_violations_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown report context keys"):
        write_report(tmp_path, {"models": _models()}, {"modle": "dual:default"})
    models = _models()
    models["label"]["n"] = 6
    with pytest.raises(ValueError, match="different test sets"):
        write_report(tmp_path, {"models": models}, {})
    assert not (tmp_path / "report.md").exists()
