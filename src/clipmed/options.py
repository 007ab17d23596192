"""Command-line options declared once, on the fields of the config dataclasses (as transformers'
HfArgumentParser does for its examples): name, type, default, help and valid range are written in one place,
and the CLI flags and the config built from the parsed flags both derive from it.

    epochs: int = option(3, "passes over the training rows", min=1)

gives `--epochs N` (an int, checked >= 1 when parsing, before any model loads). A bool field whose default
is False (or None) gives `--x`; one whose default is True gives `--no-x`, which sets it False (`flag=` names the
flag differently, e.g. `--update-batchnorm` for `freeze_batchnorm`); a `bool | None` field with
`choices=AUTO_ON_OFF` takes auto (None), on or off. A `tuple[...]` or `list[...]` field takes a
comma-separated list. Fields declared with a plain `dataclasses.field` are no command-line option.

`add_options(parser, Cls, prefix="train.")` stores each value under the dest `prefix + field name`, so the dests
of a parsed command line are the config paths that a recipe's values are overridden at (`config_files`).
"""

from __future__ import annotations

import argparse
import math
import types
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Collection, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

Config = TypeVar("Config")

# The seeds clipmed passes on (torch, numpy's legacy and new generators, random) all accept 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

_KEY = "clipmed_option"
# The choices of a `bool | None` option that can also be left to a rule ("auto": None).
AUTO_ON_OFF = ("auto", "on", "off")
_TRISTATE = {"auto": None, "on": True, "off": False}


def option(default: Any = MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
           above: float | None = None, choices: Sequence[Any] | None = None, flag: str | None = None,
           metavar: str | None = None, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    min/max: inclusive bounds, above: an exclusive lower bound (a rate > 0); choices: the allowed values (of
    each item, for a list); flag: the flag's name when it is not derived from the field's name.
    """
    metadata = {_KEY: {"help": help, "min": min, "max": max, "above": above, "choices": choices, "flag": flag,
                       "metavar": metavar}}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def own_first(cls: type) -> list[Field]:
    """The fields of dataclass `cls`, its own first, then those of its bases (TrainConfig's objective options)."""
    own = vars(cls).get("__annotations__", {})
    return sorted(fields(cls), key=lambda f: f.name not in own)


def option_fields(cls: type) -> list[Field]:
    """The fields of dataclass `cls` declared with `option`, its own first."""
    return [f for f in own_first(cls) if _KEY in f.metadata]


def flag_name(f: Field) -> str:
    """The command-line flag of an option field."""
    spec = f.metadata[_KEY]
    if spec["flag"]:
        return spec["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if _default(f) is True else f"--{name}"


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, prefix: str = "",
                only: Collection[str] | None = None, exclude: Collection[str] = (),
                defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for each option field of `cls` (those in `only`, none in `exclude`); `defaults` replaces the
    dataclass default of some fields for this parser."""
    hints = get_type_hints(cls)
    for f in option_fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        spec = f.metadata[_KEY]
        default = (defaults or {}).get(f.name, _default(f))
        kind, container = _base_type(hints[f.name])
        shown = _shown(default)
        help_text = spec["help"] + (f" (default: {shown})" if shown and kind is not bool else "")
        common = dict(dest=prefix + f.name, default=default, help=help_text)
        if kind is bool and spec["choices"] == AUTO_ON_OFF:
            parser.add_argument(flag_name(f), type=_tristate, metavar="{auto,on,off}",
                                **{**common, "help": spec["help"] + " (default: auto)"})
            continue
        if kind is bool:
            parser.add_argument(flag_name(f), action="store_false" if default is True else "store_true", **common)
            continue
        parse = checked(kind, min=spec["min"], max=spec["max"], above=spec["above"], choices=spec["choices"])
        if container is not None:
            parse = _listed(parse, container)
        parser.add_argument(flag_name(f), type=parse, metavar=spec["metavar"] or _metavar(f, kind, container is not None),
                            **common)


def from_args(cls: type[Config], args: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> Config:
    """An instance of `cls` whose option fields take the parsed values (dests `prefix + name`) and whose other
    fields keep their defaults, except those in `overrides`."""
    values = {f.name: getattr(args, prefix + f.name) for f in option_fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **overrides})


def _default(f: Field) -> Any:
    """The field's default; None for a required field (left to the command line or a recipe)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def _shown(default: Any) -> str:
    if default is None or default == () or default == []:
        return ""
    if isinstance(default, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def _base_type(hint: Any) -> tuple[type, type | None]:
    """(item type, the container: tuple or list, or None for a single value) of a field's type hint; Optional
    is unwrapped."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(hint), get_args(hint)
    if origin in (tuple, list):
        return args[0], origin
    return hint, None


def _metavar(f: Field, kind: type, is_list: bool) -> str:
    choices = f.metadata[_KEY]["choices"]
    if choices is not None:
        return "{" + ",".join(map(str, choices)) + "}" + (",..." if is_list else "")
    word = {int: "N", float: "X"}.get(kind, f.name.split("_")[-1].upper())
    return f"{word},..." if is_list else word


def checked(kind: type, *, min: float | None = None, max: float | None = None, above: float | None = None,
            choices: Sequence[Any] | None = None) -> Callable[[str], Any]:
    """An argparse type: text -> `kind`, checked against a range and choices when parsing."""

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError is argparse's "invalid int value: 'x'"
        problem = range_problem(value, min=min, max=max, above=above, choices=choices)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def range_problem(value: Any, *, min: float | None = None, max: float | None = None, above: float | None = None,
                  choices: Sequence[Any] | None = None) -> str | None:
    """Why `value` is outside an option's range, or None: the one test of typed flags and of recipe values."""
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {', '.join(map(str, choices))}"
    if isinstance(value, float) and value != value:  # NaN passes every comparison below
        return f"{value!r} is not a number"
    if isinstance(value, float) and math.isinf(value):  # no option takes an infinite value
        return f"{value!r} is not a finite number"
    if min is not None and value < min:
        return f"{value} is below the minimum {min:g}"
    if max is not None and value > max:
        return f"{value} is above the maximum {max:g}"
    if above is not None and value <= above:
        return f"{value} must be greater than {above:g}"
    return None


def field_problem(f: Field, value: Any) -> str | None:
    """`range_problem` of a value for an option field (of each item, for a list field); None for a field that is
    no option, for None and for booleans."""
    spec = f.metadata.get(_KEY)
    if spec is None or value is None or isinstance(value, bool):
        return None
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (int, float, str)) and not isinstance(item, bool):
            problem = range_problem(item, min=spec["min"], max=spec["max"], above=spec["above"],
                                    choices=spec["choices"])
            if problem:
                return problem
    return None


def _tristate(text: str) -> bool | None:
    if text not in _TRISTATE:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(AUTO_ON_OFF)}")
    return _TRISTATE[text]


def _listed(parse: Callable[[str], Any], container: type) -> Callable[[str], Any]:
    def parse_list(text: str) -> Any:
        return container(parse(item.strip()) for item in text.split(",") if item.strip())

    parse_list.__name__ = "list"
    return parse_list
