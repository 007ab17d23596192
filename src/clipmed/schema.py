"""YAML mappings -> config dataclasses, checked key by key: recipes (`config_files.py`) and benchmark suites;
`read_mapping` is also how vocabularies and prompt template files are read.

An unknown key or a value of the wrong type is a ClipmedError naming the file and the key's path, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import os
import types
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ClipmedError
from .options import field_problem, own_first

Config = TypeVar("Config")


def read_mapping(path: str | os.PathLike, what: str, shape: str) -> dict:
    """The YAML mapping in `path`; unreadable files, invalid YAML (with its line) and a non-mapping are
    one-line errors. `what` names the file's kind ("recipe"), `shape` says what it must hold."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as exc:
        raise ClipmedError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ClipmedError(f"{path}: not UTF-8 text (byte {exc.start}); a {what} is a YAML text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ClipmedError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(values, dict):
        raise ClipmedError(f"{path}: {shape}")
    return values


def build(cls: type[Config], values: dict, path: str, prefix: str = "", *, missing_ok: bool = False) -> Config:
    """An instance of dataclass `cls` from a YAML mapping, checking every key and value against `cls`'s hints.

    A required field the mapping leaves out is an error, or None with `missing_ok` (a recipe leaves `data`
    and `out` to the command line). Nested dataclasses (also as list items) are built the same way.
    """
    hints = get_type_hints(cls)
    known = [f.name for f in own_first(cls)]
    by_name = {f.name: f for f in fields(cls)}
    checked = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ClipmedError(f"{path}: unknown key '{where}' (known keys{' in ' + prefix[:-1] if prefix else ''}: "
                               f"{', '.join(known)})")
        checked[key] = _value(value, hints[key], path, where, missing_ok)
        problem = field_problem(by_name[key], checked[key])  # the range its command-line flag has
        if problem:
            raise ClipmedError(f"{path}: '{where}': {problem}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    absent = [name for name in required if name not in checked]
    if absent and not missing_ok:
        raise ClipmedError(f"{path}: '{prefix}{absent[0]}' is missing (required keys{' in ' + prefix[:-1] if prefix else ''}: "
                           f"{', '.join(required)})")
    return cls(**{**{name: None for name in absent}, **checked})


def _value(value: Any, hint: Any, path: str, where: str, missing_ok: bool) -> Any:
    """`value` checked against the type hint; ints widen to float, and a number PyYAML read as text ("5e-4",
    YAML 1.1 wants "5.0e-4") is taken as the float it spells."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _value(value, hint, path, where, missing_ok)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ClipmedError(f"{path}: '{where}' must be a mapping of {hint.__name__} options")
        return build(hint, value, path, f"{where}.", missing_ok=missing_ok)
    if origin in (list, tuple) and isinstance(value, list):
        items = [_value(item, args[0], path, f"{where}[{i}]", missing_ok) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        return {_value(k, args[0], path, where, missing_ok): _value(v, args[1], path, f"{where}.{k}", missing_ok)
                for k, v in value.items()}
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = getattr(hint, "__name__", str(hint)) if origin is None else str(hint)
    raise ClipmedError(f"{path}: '{where}' must be {expected}, not {value!r}")
