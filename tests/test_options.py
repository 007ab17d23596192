"""Options declared on dataclass fields: flags, types, negation, lists and ranges come from the declaration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from clipmed.cli import build_parser, main
from clipmed.options import add_options, from_args, option
from clipmed.training.config import TrainConfig


@dataclass
class Example:
    steps: int = option(3, "how many", min=1)
    rate: float | None = option(None, "a rate", above=0)
    cache: bool = option(True, "use the cache")
    verbose: bool = option(False, "say more")
    names: tuple[str, ...] = option(("a",), "names", choices=("a", "b", "c"))
    internal: int = 7  # a plain field: no flag


def _parse(argv: list[str], prefix: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, Example, prefix=prefix)
    return parser.parse_args(argv)


def test_flags_types_and_defaults_come_from_the_fields():
    assert from_args(Example, _parse([])) == Example()
    parsed = from_args(Example, _parse(["--steps", "5", "--rate", "0.5", "--no-cache", "--verbose", "--names", "b,c"]))
    assert parsed == Example(steps=5, rate=0.5, cache=False, verbose=True, names=("b", "c"))
    assert from_args(Example, _parse(["--steps", "2"], prefix="train."), prefix="train.", internal=1) == \
        Example(steps=2, internal=1)
    with pytest.raises(SystemExit):
        _parse(["--internal", "1"])


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "below the minimum 1"),
                                           (["--steps", "x"], "invalid int value: 'x'"),
                                           (["--rate", "0"], "greater than 0"),
                                           (["--rate", "nan"], "not a number"),
                                           (["--rate", "inf"], "not a finite number"),
                                           (["--names", "a,d"], "not one of a, b, c")])
def test_values_out_of_range_are_refused_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit):
        parser = argparse.ArgumentParser()
        add_options(parser, Example)
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_train_command_builds_a_train_config_from_its_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr("clipmed.training.train.train", lambda config, **_: seen.setdefault("config", config) and "run")
    assert main(["train", "--data", "d", "--out", "o", "--objective", "siglip", "--update-batchnorm",
                 "--no-feature-cache", "--report-to", "tensorboard", "--lr-new", "0.01"]) == 0
    assert seen["config"] == TrainConfig(data="d", out="o", objective="siglip", freeze_batchnorm=False,
                                         feature_cache=False, report_to=("tensorboard",), lr_new=0.01)


def test_reproduce_takes_every_objective_and_per_objective_epochs():
    args = build_parser().parse_args(["reproduce", "--objectives", "caption,siglip", "--siglip-epochs", "2",
                                      "--batch-size", "8", "--label-field", "modality"])
    assert getattr(args, "objectives") == ("caption", "siglip") and getattr(args, "epochs.siglip") == 2
    assert getattr(args, "train.batch_size") == 8 and getattr(args, "fields.label_field") == "modality"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "--objectives", "caption,nothing"])
