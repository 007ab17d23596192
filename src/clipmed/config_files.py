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
import types
from collections.abc import Collection
from dataclasses import MISSING, fields, is_dataclass, replace
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ClipmedError
from .pipeline import ReproduceConfig
from .training.config import TrainConfig

Config = TypeVar("Config")

# reproduce sets these for each run it trains: in a recipe they belong at the top level (or to the command line).
_SET_PER_RUN = ("data", "out", "model", "objective", "seed")


def load_recipe(path: str | os.PathLike) -> ReproduceConfig:
    """The ReproduceConfig a recipe describes (`data`/`out` are None where the recipe leaves them out)."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as exc:
        raise ClipmedError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ClipmedError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(values, dict):
        raise ClipmedError(f"{path}: a recipe is a YAML mapping of option names to values")
    train = values.get("train")
    misplaced = sorted(set(_SET_PER_RUN) & set(train)) if isinstance(train, dict) else []
    if misplaced:
        raise ClipmedError(f"{path}: train.{misplaced[0]} is set by reproduce for each run; "
                           f"put `{misplaced[0]}` at the top level of the recipe (or give it on the command line)")
    return _build(ReproduceConfig, values, str(path), "")


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


def _build(cls: type[Config], values: dict, path: str, prefix: str) -> Config:
    """An instance of dataclass `cls` from a YAML mapping, checking every key and value against `cls`;
    required fields the mapping leaves out are None (left to the command line)."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    checked = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ClipmedError(f"{path}: unknown key '{where}' (known keys{' in ' + prefix[:-1] if prefix else ''}: "
                               f"{', '.join(known)})")
        if is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ClipmedError(f"{path}: '{where}' must be a mapping of {hints[key].__name__} options")
            checked[key] = _build(hints[key], value, path, f"{where}.")
        else:
            checked[key] = _value(value, hints[key], path, where)
    required = {f.name: None for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    return cls(**{**required, **checked})


def _value(value: Any, hint: Any, path: str, where: str) -> Any:
    """`value` checked against the type hint; ints widen to float, and a number PyYAML read as text ("5e-4",
    YAML 1.1 wants "5.0e-4") is taken as the float it spells."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _value(value, hint, path, where)
    if origin in (list, tuple) and isinstance(value, list):
        items = [_value(item, args[0], path, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        return {_value(k, args[0], path, where): _value(v, args[1], path, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = getattr(hint, "__name__", str(hint)) if origin is None else str(hint)
    raise ClipmedError(f"{path}: '{where}' must be {expected}, not {value!r}")
