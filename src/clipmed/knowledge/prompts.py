"""Prompt templates for zero-shot classification with prompt ensembles (``resources/prompts.yaml``).

Templates are keyed by the kind of label field they describe (``body_part``, ``modality``); any other field
uses ``default``. The first template of each of these lists is the single prompt of the MedCLIP/CLIP papers,
"A medical image of {label}", so a one-prompt run and the first member of an ensemble agree. Multi-label
findings use ``finding_present`` (positive prompts) against ``finding_absent`` (negative prompts, in order).
"""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

import yaml

from clipmed.errors import ClipmedError
from clipmed.schema import read_mapping

# The papers' single prompt: training (label objective), zero-shot evaluation and `clipmed predict` default to it.
DEFAULT_TEMPLATE = "A medical image of {label}"


def load_templates(label_field: str, path: str | Path | None = None) -> list[str]:
    """Templates (each with one ``{label}`` placeholder) for a label field, falling back to ``default``."""
    if path is None:
        data = yaml.safe_load(resources.files("clipmed").joinpath("resources/prompts.yaml").read_text(encoding="utf-8"))
        source = "clipmed/resources/prompts.yaml"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ClipmedError(f"prompt template file not found: {p}")
        data = read_mapping(p, "prompt template file", "a prompt template file maps label fields to lists of templates")
        source = str(p)
    key = label_field if label_field in data else "default"
    templates = data.get(key)
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ClipmedError(f"prompt template file {source}: {key!r} must be a non-empty list of strings")
    for t in templates:
        check_template(t, source)
    return list(templates)


def check_template(template: str, source: str) -> None:
    """A ClipmedError naming `source` unless `template` has exactly one ``{label}`` and no other field."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:  # an unmatched brace
        fields = []
    if fields != ["label"]:
        raise ClipmedError(f"prompt template {template!r} in {source} must contain exactly one {{label}} and no other "
                           "fields")
