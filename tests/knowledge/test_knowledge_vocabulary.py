"""Vocabulary files (user-supplied YAML, round trip, validation), coverage report, prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from clipmed.errors import ClipmedError
from clipmed.knowledge import ConceptExtractor, Vocabulary, coverage, extract, format_coverage, load_templates

ROCO = Path(__file__).resolve().parents[2].parent / "shared/datasets/roco-radiology"

USER_VOCAB = {
    "ignore": ["fish bone"],
    "concepts": {
        "bone": {"group": "region", "synonyms": ["bone", "osse*"]},
        "ct": {"group": "modality", "synonyms": ["computed tomography"], "abbreviations": ["CT"]},
        "fracture": {"group": "finding", "synonyms": ["fractur*"], "implies": ["bone"]},
        "pneumothorax": {"group": "finding", "synonyms": ["pneumothorax"], "labels": ["PTX class"]},
    },
}


def test_user_vocabulary_file_round_trip(tmp_path):
    path = tmp_path / "my_concepts.yaml"
    path.write_text(yaml.safe_dump(USER_VOCAB), encoding="utf-8")
    vocab = Vocabulary.load(path)
    assert vocab.concepts == ["bone", "ct", "fracture", "pneumothorax"] and len(vocab) == 4
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(vocab.to_dict(), sort_keys=False), encoding="utf-8")
    assert Vocabulary.load(again) == vocab and Vocabulary.load(again).fingerprint == vocab.fingerprint

    assert extract("CT: osseous fractures, no pneumothorax.", vocab) == {"bone": 1.0, "ct": 1.0, "fracture": 1.0}
    assert extract("A fish bone in the throat.", vocab) == {}
    ex = ConceptExtractor(vocab)
    assert ex.vector("possible fracture").tolist() == [1.0, 0.0, 0.5, 0.0]  # implied region stays 1.0
    assert ex.label_vector("ptx class").tolist() == [0.0, 0.0, 0.0, 1.0]


def test_bare_mapping_without_concepts_key(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump(USER_VOCAB["concepts"]), encoding="utf-8")
    assert Vocabulary.load(path).concepts == ["bone", "ct", "fracture", "pneumothorax"]


def test_default_vocabulary_round_trips():
    vocab = Vocabulary.default()
    assert Vocabulary.from_dict(yaml.safe_load(yaml.safe_dump(vocab.to_dict(), sort_keys=False))) == vocab


@pytest.mark.parametrize(
    "data, message",
    [
        ({"x": {"group": "organ", "synonyms": ["x"]}}, "group"),
        ({"x": {"group": "region"}}, "no synonyms"),
        ({"x": {"group": "region", "synonyms": ["x"], "implies": ["y"]}}, "unknown concepts"),
        ({"x": {"group": "region", "synonyms": "x"}}, "non-empty strings"),
        ({"x": {"group": "region", "synonyms": ["x"], "colour": "red"}}, "unknown keys"),
        ({"x": ["x"]}, "needs a mapping"),
        ({"concepts": {}}, "no concepts"),
        (["x"], "must be a mapping"),
    ],
)
def test_invalid_vocabularies_fail_clearly(data, message):
    with pytest.raises(ClipmedError, match=message):
        Vocabulary.from_dict(data)


def test_missing_and_broken_vocabulary_files(tmp_path):
    with pytest.raises(ClipmedError, match="not found"):
        Vocabulary.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("concepts: [unclosed", encoding="utf-8")
    with pytest.raises(ClipmedError, match="not valid YAML"):
        Vocabulary.load(bad)


def test_coverage_report_and_table():
    report = coverage(["Chest CT with a mass.", "A photograph of a cat.", "No fracture of the femur."])
    assert report["n"] == 3 and report["with_concept"] == 2 and report["share"] == pytest.approx(2 / 3)
    assert report["per_concept"]["ct"] == 1 and report["per_concept"]["fracture"] == 0
    counts = list(report["per_concept"].values())
    assert counts == sorted(counts, reverse=True)
    table = format_coverage(report, top=5)
    assert "66.7%" in table and "ct" in table and len(table.splitlines()) == 4 + 5
    assert coverage([])["share"] == 0.0


@pytest.fixture(scope="module")
def roco_rows() -> list[dict]:
    if not (ROCO / "metadata.jsonl").is_file():
        pytest.skip("roco-radiology dataset not present")
    return [json.loads(line) for line in (ROCO / "metadata.jsonl").open(encoding="utf-8")]


def test_roco_radiology_coverage_is_high(roco_rows):
    report = coverage([r["caption"] for r in roco_rows], ConceptExtractor())
    assert report["n"] == len(roco_rows) > 2000
    assert report["share"] >= 0.80, format_coverage(report, top=10)
    assert {"ct", "chest", "xray"} <= set(list(report["per_concept"])[:8])


def test_roco_labels_all_map_to_concepts(roco_rows):
    ex = ConceptExtractor()
    for label in {r[f] for r in roco_rows for f in ("body_part", "modality") if r[f]}:
        assert ex.label_vector(label).any(), label
    rows = roco_rows[:300]
    captions, labels = [r["caption"] for r in rows], [[r["body_part"], r["modality"]] for r in rows]
    both = ex.entity_matrix(captions, labels, "both")
    np.testing.assert_array_equal(both, np.maximum(ex.matrix(captions), ex.entity_matrix(captions, labels, "labels")))


# -------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("field", ["body_part", "modality", "default", "finding"])
def test_prompt_templates(field):
    templates = load_templates(field)
    assert 6 <= len(templates) <= 8
    assert templates[0] == "A medical image of {label}"
    assert len(set(templates)) == len(templates)
    assert all(t.format(label="chest") != t for t in templates)


def test_prompt_template_file_override_and_errors(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"default": ["A {label} picture"]}), encoding="utf-8")
    assert load_templates("modality", path) == ["A {label} picture"]
    path.write_text(yaml.safe_dump({"default": ["A {lable} picture"]}), encoding="utf-8")
    with pytest.raises(ClipmedError, match="exactly one"):
        load_templates("default", path)
    with pytest.raises(ClipmedError, match="not found"):
        load_templates("default", tmp_path / "missing.yaml")
