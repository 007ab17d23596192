"""Same seed, same data: the same split manifest, the same weights and the same evaluation, byte for byte."""

from __future__ import annotations

import json

from clipmed import cli
from clipmed.data.split import read_manifest
from reliability_helpers import assert_same_weights, metric_rows, single_thread, train_options


def _main(*argv) -> None:
    assert cli.main([str(a) for a in argv]) == 0


def test_prepare_twice_gives_byte_identical_manifests_and_another_seed_another_split(tmp_path, synthetic_dataset):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _main("prepare", synthetic_dataset, "--out", tmp_path / name, "--seed", seed, "--group-field", "article",
              "--min-class-count", 5)
    for name in ("split.json", "ids.parquet", "rejected.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, c = (read_manifest(tmp_path / name) for name in ("a", "c"))
    assert a["splits"] != c["splits"] and a["splits"]["test"] != c["splits"]["test"]
    assert a["source"]["fingerprint"] == c["source"]["fingerprint"] and (a["seed"], c["seed"]) == (3, 4)


def test_train_twice_with_the_same_seed_gives_identical_weights_and_evaluation(tmp_path, prepared_synthetic,
                                                                             tiny_dual_folder):
    options = train_options(epochs=2)  # --epochs 2: two model selections suffice
    with single_thread():
        for name in ("a", "b"):
            _main("train", "--data", prepared_synthetic, "--model", tiny_dual_folder, "--out", tmp_path / name,
                  *options)
            _main("evaluate", "--model", tmp_path / name, "--data", prepared_synthetic, "--precision", "fp32",
                  "--out", tmp_path / f"{name}.json")
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["n"] == len(read_manifest(prepared_synthetic)["splits"]["test"])
