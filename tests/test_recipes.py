"""Recipes (configs/*.yaml): they load into the config dataclasses, reject what they do not know, and the
command line's typed flags override them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipmed.cli import main
from clipmed.config_files import load_recipe, recipe_train_config, with_overrides
from clipmed.data.records import FieldMap
from clipmed.data.sources import load_source
from clipmed.errors import ClipmedError
from clipmed.pipeline import ReproduceConfig
from clipmed.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.data and recipe.out and recipe.fields.label_field == "body_part"


def test_roco_default_is_the_library_defaults_on_roco_split_by_article():
    recipe = load_recipe(REPO / "configs" / "roco-default.yaml")
    assert recipe == ReproduceConfig(data="../shared/datasets/roco-radiology", out="runs/roco-default",
                                     fmt="imagefolder", fields=FieldMap(group_field="article"))
    assert (REPO / recipe.data / "metadata.jsonl").exists()  # relative to the repo root, where it is run


def test_paper_recipe_is_the_papers_setup_and_its_fields_fit_pubmedvision(tmp_path):
    recipe = load_recipe(REPO / "configs" / "paper-pubmedvision-clip.yaml")
    assert recipe.model == "hf:openai/clip-vit-base-patch32" and recipe.fmt == "pubmedvision"
    assert recipe.n == 4096 and recipe.objectives == ("caption", "label")
    assert recipe.train.resolved_lr_clip() == pytest.approx(5e-4 * recipe.train.batch_size / 32768)
    assert recipe.train.label_template == recipe.evaluation.template == "A medical image of {label}"
    # One row in PubMedVision's layout, read with the recipe's field names.
    (tmp_path / "images").mkdir()
    row = {"id": "pmc_1", "image": ["images/pmc_1.jpg"], "body_part": "Chest", "modality": "CT",
           "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A chest CT."}]}
    (tmp_path / "data.json").write_text(json.dumps([row]))
    record = load_source(str(tmp_path / "data.json"), fmt=recipe.fmt, fields=recipe.fields,
                         image_root=str(tmp_path)).records[0]
    assert (record.caption, record.label, record.image_path) == ("A chest CT.", "Chest",
                                                                str(tmp_path / "images" / "pmc_1.jpg"))


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_omitted_keys_keep_defaults_and_numbers_are_read_as_written(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "train:\n  lr_new: 5e-4\n  warmup_fraction: 0\nepochs: {label: 6}\n"))
    assert recipe.data is None and recipe.out is None  # left to the command line
    assert recipe.train.lr_new == 5e-4 and recipe.train.warmup_fraction == 0.0  # PyYAML reads 5e-4 as text
    assert recipe.epochs == {"label": 6} and recipe.train.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(("text", "message"), [
    ("epoch: 3\n", "unknown key 'epoch'"),
    ("train:\n  batchsize: 64\n", "unknown key 'train.batchsize' (known keys in train: data, out"),
    ("fields:\n  labelfield: modality\n", "unknown key 'fields.labelfield'"),
    ("train:\n  epochs: four\n", "'train.epochs' must be int, not 'four'"),
    ("train:\n  lock_image: 1\n", "'train.lock_image' must be bool"),
    ("objectives: caption\n", "'objectives' must be tuple[str, ...]"),
    ("train:\n  model: hf:x\n", "train.model is set by reproduce for each run; put `model` at the top level"),
    ("fields: article\n", "'fields' must be a mapping of FieldMap options"),
    ("- data\n", "a recipe is a YAML mapping"),
    ("data: [unclosed\n", "recipe.yaml:2: not valid YAML"),
])
def test_mistakes_are_errors_naming_the_file_and_the_key(tmp_path, text, message):
    path = _recipe(tmp_path, text)
    with pytest.raises(ClipmedError) as error:
        load_recipe(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_a_missing_recipe_is_a_user_error(tmp_path):
    with pytest.raises(ClipmedError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_with_overrides_replaces_only_the_named_paths():
    base = ReproduceConfig(data="a", out="b", epochs={"label": 6}, train=TrainConfig(epochs=9, lr_new=0.5))
    flags = ReproduceConfig(data="x", out="y", seed=3, epochs={"caption": 2}, train=TrainConfig(epochs=1))
    merged = with_overrides(base, flags, {"seed", "train.epochs", "epochs.caption"})
    assert (merged.data, merged.seed, merged.epochs) == ("a", 3, {"label": 6, "caption": 2})
    assert (merged.train.epochs, merged.train.lr_new) == (1, 0.5)
    assert base.epochs == {"label": 6}  # the base is not modified


RECIPE = """\
data: some/dataset
out: some/out
model: hf:some/clip
seed: 7
fields: {label_field: modality, group_field: article}
epochs: {label: 6}
train: {epochs: 5, batch_size: 64, lr_new: 1.0e-2, freeze_batchnorm: true}
evaluation: {n_boot: 200}
"""


@pytest.fixture
def captured(monkeypatch) -> dict:
    """Runs no work: records the config `reproduce` and `train` would have been called with."""
    seen = {}

    def reproduce(config: ReproduceConfig) -> dict:
        seen["config"] = config
        return {"models": {}}

    def train(config: TrainConfig) -> Path:
        seen["config"] = config
        return Path(config.out)

    monkeypatch.setattr("clipmed.pipeline.reproduce", reproduce)
    monkeypatch.setattr("clipmed.training.train.train", train)
    return seen


def test_reproduce_takes_the_recipe_and_typed_flags_win(tmp_path, captured):
    path = _recipe(tmp_path, RECIPE)
    assert main(["reproduce", "--config", str(path), "--out", "elsewhere", "--batch-size", "32",
                 "--caption-epochs", "2", "--update-batchnorm", "--group-field", "pmcid"]) == 0
    config = captured["config"]
    assert (config.data, config.out, config.model, config.seed) == ("some/dataset", "elsewhere", "hf:some/clip", 7)
    assert config.fields == FieldMap(label_field="modality", group_field="pmcid")
    assert config.epochs == {"label": 6, "caption": 2}
    # --batch-size 32 is the default, but it was typed: it overrides the recipe's 64.
    assert (config.train.batch_size, config.train.epochs, config.train.lr_new) == (32, 5, 1e-2)
    assert config.train.freeze_batchnorm is False and config.evaluation.n_boot == 200


def test_train_takes_the_recipes_training_section_model_and_seed(tmp_path, captured):
    path = _recipe(tmp_path, RECIPE)
    assert main(["train", "--config", str(path), "--data", "prepared", "--out", "run", "--lr-new", "0.5"]) == 0
    expected = with_overrides(recipe_train_config(load_recipe(path)),
                              TrainConfig(data="prepared", out="run", lr_new=0.5), {"data", "out", "lr_new"})
    assert captured["config"] == expected
    assert (expected.model, expected.seed, expected.batch_size) == ("hf:some/clip", 7, 64)


def test_command_line_mistakes_with_recipes(tmp_path, captured, capsys):
    assert main(["reproduce", "--config", str(_recipe(tmp_path, "seed: 1\n"))]) == 2
    assert "reproduce needs --data and --out" in capsys.readouterr().err
    assert main(["train", "--config", str(_recipe(tmp_path, RECIPE)), "--resume", "run"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["reproduce", "--config", str(_recipe(tmp_path, "n_rows: 5\n")), "--data", "d", "--out", "o"]) == 2
    assert "unknown key 'n_rows'" in capsys.readouterr().err
    assert "config" not in captured
