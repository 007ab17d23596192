"""Recipes: a whole `clipmed reproduce` setup in one YAML file (configs/*.yaml), read into the config dataclasses.

Keys are the field names of `ReproduceConfig`; the sections `fields`, `train` and `evaluation` hold those of
`FieldMap`, `TrainConfig` and `EvalConfig`. Omitted keys keep the dataclass defaults; `data` and `out` may be
left to the command line. Relative paths are taken from the working directory, as on the command line. An
unknown key or a value of the wrong type is a ClipmedError naming the file and the key, so a typo never
silently falls back to a default. On the command line, `--config FILE` loads a recipe and every flag typed
there overrides it (`with_overrides`).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import replace
from typing import Any, TypeVar

from .errors import ClipmedError
from .pipeline import ReproduceConfig
from .schema import build, read_mapping
from .training.config import PER_RUN_FIELDS, TrainConfig

Config = TypeVar("Config")


def load_recipe(path: str | os.PathLike) -> ReproduceConfig:
    """The ReproduceConfig a recipe describes (`data`/`out` are None where the recipe leaves them out)."""
    values = read_mapping(path, "recipe", "a recipe is a YAML mapping of option names to values")
    train = values.get("train")
    misplaced = sorted(set(PER_RUN_FIELDS) & set(train)) if isinstance(train, dict) else []
    if misplaced:
        raise ClipmedError(f"{path}: train.{misplaced[0]} is set by reproduce for each run; "
                           f"put `{misplaced[0]}` at the top level of the recipe (or give it on the command line)")
    return build(ReproduceConfig, values, str(path), missing_ok=True)


def recipe_train_config(recipe: ReproduceConfig) -> TrainConfig:
    """What `clipmed train --config` starts from: the recipe's training section with its model and seed."""
    return replace(recipe.train, model=recipe.model, seed=recipe.seed)


def with_overrides(base: Config, flags: Config, paths: Collection[str]) -> Config:
    """`base` (a recipe's config) with the value at each dotted path taken from `flags` (the command line's).

    A path names a field, a field of a section or a key of a dict field: "seed", "train.epochs", "epochs.caption".
    """
    for path in paths:
        base = _with(base, path.split("."), _get(flags, path))
    return base


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _with(obj: Any, parts: list[str], value: Any) -> Any:
    head, *rest = parts
    if rest:
        value = _with(_get(obj, head), rest, value)
    return {**obj, head: value} if isinstance(obj, dict) else replace(obj, **{head: value})
