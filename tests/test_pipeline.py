"""reproduce and sweep on synthetic data with a tiny model: every evaluation and figure, and resumability."""

from __future__ import annotations

import json

import pytest

from clipmed.cli import main

TINY_TRAINING = ["--batch-size", "8", "--lr-new", "3e-3", "--lr-pretrained", "3e-3", "--update-batchnorm",
                 "--precision", "fp32"]


@pytest.fixture(scope="module")
def reproduced(synthetic_dataset, tiny_dual_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--data", str(synthetic_dataset), "--out", str(out), "--model", str(tiny_dual_folder),
                 "--min-class-count", "5", "--epochs", "2", "--semantic-temperatures", "1", "--methods", "label-wise-ft",
                 *TINY_TRAINING]) == 0
    return out


def test_reproduce_evaluates_every_model_every_way(reproduced):
    metrics = json.loads((reproduced / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "caption", "label", "semantic", "label-wise-ft"}
    for result in metrics["models"].values():
        assert result["template"] == "A medical image of {label}"
        assert len(result["ensemble"]["templates"]) > 1 and result["ensemble"]["n"] == result["n"]
        assert set(result["probe"]) == {"full", "k_shot"}
        assert result["retrieval"]["image_to_text"]["n_queries"] == result["n"]
    html = (reproduced / "report.html").read_text()
    assert "Retrieval gallery" in html and "<code>caption</code>" in html
    for figure in ("per_class.png", "embeddings.png"):
        assert (reproduced / figure).stat().st_size > 1000
    report = (reproduced / "report.md").read_text()
    assert set(metrics["semantic_temperature"]) == {"0.1", "1"}  # the default run and MedCLIP's tau_t = 1
    for section in ("semantic", "embeddings.png", "P@1", "ensemble", "Linear probe", "Semantic target temperature"):
        assert section.lower() in report.lower(), section
    semantic_run = json.loads((reproduced / "runs" / "semantic" / "run.json").read_text())
    assert semantic_run["config"]["entities_from"] == "captions"
    assert semantic_run["best"]["val_mean_recall_at_1"] is not None  # selected without labels


def test_sweep_trains_growing_fractions_and_plots_them(reproduced, tiny_dual_folder, tmp_path):
    assert main(["sweep", "--data", str(reproduced / "prepared"), "--out", str(tmp_path), "--model",
                 str(tiny_dual_folder), "--fractions", "0.5,1", "--objectives", "caption,label", "--epochs", "1",
                 *TINY_TRAINING]) == 0
    points = json.loads((tmp_path / "sweep.json").read_text())
    assert set(points) == {"caption", "label"}
    for rows in points.values():
        assert [p["fraction"] for p in rows] == [0.5, 1.0]
        assert rows[0]["n_train"] < rows[1]["n_train"]
        assert all(p["ci95"][0] <= p["top1"] <= p["ci95"][1] for p in rows)
    assert (tmp_path / "data_efficiency.png").exists()


def test_methods_are_run_folders_and_every_model_is_scored_on_the_other_label_field(reproduced, tiny_dual_folder,
                                                                                    tmp_path, capsys):
    metrics = json.loads((reproduced / "metrics.json").read_text())
    wise = json.loads((reproduced / "runs" / "label-wise-ft" / "run.json").read_text())
    assert (reproduced / "runs" / "label-wise-ft" / "model").is_dir()
    assert wise["wise_ft"]["base"] == str(reproduced / "runs" / "caption")
    assert wise["wise_ft"]["finetuned"] == str(reproduced / "runs" / "label-from-caption")
    started = json.loads((reproduced / "runs" / "label-from-caption" / "run.json").read_text())
    assert started["config"]["init"] == str(reproduced / "runs" / "caption")
    assert metrics["training"]["label-wise-ft"]["wise_ft_alpha"] == wise["wise_ft"]["chosen"]
    assert metrics["training"]["caption"]["trainable_parameters"] > 0
    for name in metrics["models"]:  # modality: CT or MRI on every other synthetic row
        modality = metrics["other_label_fields"][name]["modality"]
        assert modality["classes"] == ["CT", "MRI"] and modality["ci95"]["top1"][0] <= modality["top1"]
    report = (reproduced / "report.md").read_text()
    assert "Other label fields (forgetting)" in report and "Trainable parameters" in report
    # The same on the command line: a folder prepared for body_part, scored by modality.
    assert main(["evaluate", "--model", str(tiny_dual_folder), "--data", str(reproduced / "prepared"), "--split",
                 "test", "--label-field", "modality", "--out", str(tmp_path / "modality.json")]) == 0
    result = json.loads((tmp_path / "modality.json").read_text())
    assert result["classes"] == ["CT", "MRI"]
    assert result["n"] == metrics["other_label_fields"]["base"]["modality"]["n"]
