"""Benchmark suites: schema errors, a multilabel CSV, unreadable images skipped and counted, the embedding
cache, the suite average and its interval, and `clipmed benchmark` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipmed import cli
from clipmed.errors import ClipmedError
from clipmed.evaluation import benchmark
from clipmed.evaluation.benchmark import (BenchmarkConfig, DatasetData, Evaluation, SuiteDataset, findings_of,
                                          image_embeddings, load_suite, read_suite, summarize)
from clipmed.evaluation.metrics import percentile_interval
from clipmed.models import load_model
from clipmed.models.base import model_fingerprint
from helpers import write_synthetic_imagefolder

FINDINGS = ["effusion", "fracture", "mass"]


def write_multilabel_csv(root: Path, rows: int = 18) -> Path:
    """A CSV whose `findings` column holds ';'-delimited findings (some rows none), images beside it."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "findings.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "file_name", "caption", "findings"])
        for i in range(rows):
            found = [name for j, name in enumerate(FINDINGS) if (i >> j) & 1]
            pixels = np.full((24, 24, 3), 40 * (len(found) + 1), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{i}.png")
            writer.writerow([f"r{i}", f"img/{i}.png", f"case {i}", ";".join(found)])
    return root / "findings.csv"


@pytest.fixture
def suite_file(tmp_path) -> Path:
    write_synthetic_imagefolder(tmp_path / "body", per_class=6, unlabeled=2, seed=3)
    write_multilabel_csv(tmp_path / "ml")
    (tmp_path / "body" / "images" / "img_0000.png").write_text("not an image")  # unreadable, in one dataset only
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "datasets:\n"
        "  - name: body\n    data: body\n    label_field: body_part\n    min_class_count: 2\n"
        "    class_prompts: {Head: head and brain}\n    val: body\n"
        "  - name: findings\n    data: ml/findings.csv\n    label_field: findings\n    task: multilabel\n"
        "    label_sep: ';'\n    min_class_count: 2\n")
    return suite


def test_multilabel_csv_is_read_into_a_target_matrix(suite_file):
    datasets = read_suite(load_suite(suite_file))
    findings = datasets[1]
    assert findings.classes == sorted(FINDINGS) and findings.targets.shape == (18, 3)
    row5 = [r.id for r in findings.records].index("r5")  # 5 = effusion + mass
    assert dict(zip(findings.classes, findings.targets[row5])) == {"effusion": 1, "fracture": 0, "mass": 1}
    assert findings.targets[[r.id for r in findings.records].index("r0")].sum() == 0  # an empty field: no finding


def test_findings_field_as_json_list_or_delimited_text():
    assert findings_of('["effusion", "mass"]', None, "x") == ["effusion", "mass"]
    assert findings_of("effusion| mass |", "|", "x") == ["effusion", "mass"]
    assert findings_of(None, ";", "x") is None and findings_of("", ";", "x") == []
    with pytest.raises(ClipmedError, match="row 3: label .* not a JSON list of strings"):
        findings_of("[1, 2]", None, "row 3")


@pytest.mark.parametrize("text, message", [
    ("datasets:\n  - name: a\n    data: body\n    lable_field: x\n", "unknown key 'datasets\\[0\\].lable_field'"),
    ("datasets:\n  - name: a\n    data: nowhere\n    label_field: x\n", "datasets\\[0\\] \\(a\\): data 'nowhere' not found"),
    ("datasets:\n  - name: a\n    label_field: x\n", "'datasets\\[0\\].data' is missing"),
    ("dataset: []\n", "unknown key 'dataset'"),
    ("datasets:\n  - name: a\n    data: body\n    label_field: x\n    task: multiclass\n    label_sep: ';'\n",
     "`label_sep` is for multilabel datasets"),
])
def test_schema_errors_are_one_line_naming_the_key(tmp_path, capsys, text, message):
    (tmp_path / "body").mkdir()
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(ClipmedError, match=message):
        load_suite(suite)
    assert cli.main(["benchmark", "--model", "dual:x", "--suite", str(suite), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(suite) in err


def test_suite_average_and_interval_on_two_datasets():
    def data(name: str, task: str = "multiclass") -> DatasetData:
        return DatasetData(SuiteDataset(name, "x", "y", task=task), [], np.zeros(0), ["a"], "", {}, 0)

    results = {"a": {"task": "multiclass", "ensemble": {"top1": 0.8, "ci95": {"top1": [0.7, 0.9]}}},
               "b": {"task": "multiclass", "ensemble": {"top1": 0.4, "ci95": {"top1": [0.3, 0.5]}}},
               "m": {"task": "multilabel", "ensemble": {"macro_auroc": 0.7, "ci95": {"macro_auroc": [0.6, 0.8]}}}}
    rng = np.random.default_rng(0)
    samples = {"a": rng.normal(0.8, 0.05, 500), "b": rng.normal(0.4, 0.05, 500), "m": rng.normal(0.7, 0.05, 500)}
    worse = {name: {**r, "ensemble": {**r["ensemble"]}} for name, r in results.items()}
    worse["a"]["ensemble"]["top1"] = 0.5
    out = summarize({"good": Evaluation(results, samples), "worse": Evaluation(worse, samples)},
                    [data("a"), data("b"), data("m", "multilabel")])
    average = out["average"]["good"]["multiclass_top1"]
    assert average["value"] == pytest.approx(0.6) and average["datasets"] == ["a", "b"]  # equal weights, no mixing
    assert average["ci95"] == percentile_interval((samples["a"] + samples["b"]) / 2)
    assert out["average"]["good"]["multilabel_auroc"]["value"] == pytest.approx(0.7)
    assert out["rank"]["a"] == {"good": 1, "worse": 2} and out["rank"]["b"] == {"good": 1, "worse": 1}


def test_cached_embeddings_are_reused_and_invalidated_by_another_model(suite_file, tiny_dual_folder, monkeypatch):
    data = read_suite(load_suite(suite_file))[1]
    calls = []
    real = benchmark._embed
    monkeypatch.setattr(benchmark, "_embed", lambda *a: calls.append(1) or real(*a))
    config = BenchmarkConfig()
    model = load_model(str(tiny_dual_folder))
    first = image_embeddings(model, model_fingerprint(model), data, config)
    again = image_embeddings(model, model_fingerprint(model), data, config)
    assert len(calls) == 1 and np.array_equal(first[1], again[1])
    with torch.no_grad():
        model.image_projection.weight.add_(torch.randn_like(model.image_projection.weight))  # another model
    changed = image_embeddings(model, model_fingerprint(model), data, config)
    assert len(calls) == 2 and not np.array_equal(first[1], changed[1])


def test_benchmark_command_end_to_end(suite_file, tiny_dual_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["benchmark", "--model", f"tiny={tiny_dual_folder}", str(tiny_dual_folder), "--suite",
                     str(suite_file), "--out", str(out), "--n-boot", "30", "--calibrate", "--precision", "fp32"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert result["models"] == ["tiny", tiny_dual_folder.name] and result["datasets"] == ["body", "findings"]
    body = result["results"]["tiny"]["body"]
    # The unreadable image is skipped and counted; the other dataset is untouched.
    assert body["unreadable_images"] == {"row0000": "not an image"} and body["n"] == 17
    assert "unreadable_images" not in result["results"]["tiny"]["findings"]
    assert set(body["ensemble"]["ci95"]) >= {"top1", "top3", "macro_f1", "balanced_accuracy"}
    assert body["calibration"]["temperature"] > 0 and "ece_calibrated" in body["calibration"]
    findings = result["results"]["tiny"]["findings"]["ensemble"]
    assert findings["findings"] == sorted(FINDINGS) and findings["macro_auroc"] is not None
    # Two copies of one model: the same numbers, so no cell is marked best, and equal ranks.
    assert result["results"]["tiny"] == result["results"][tiny_dual_folder.name]
    assert set(result["rank"]["body"].values()) == {1}
    assert result["average"]["tiny"]["multiclass_top1"]["datasets"] == ["body"]
    text = (out / "benchmark.md").read_text()
    assert "| Average |" in text and "**" not in text.split("## Rank")[0]
    html = (out / "benchmark.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert "tiny: multiclass_top1" in capsys.readouterr().out
