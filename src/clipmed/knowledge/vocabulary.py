"""The concept vocabulary: which medical entities the extractor looks for, and the words that name them.

A vocabulary is a YAML file (the default ships as ``clipmed/resources/concepts.yaml``; users pass their own
with the ``vocabulary_path`` option). Its order fixes the columns of every entity vector, so two runs
compare only when they use the same vocabulary (see :attr:`Vocabulary.fingerprint`).

File format::

    ignore: [mass effect, body mass index]      # phrases that name no concept (guards against false hits)
    concepts:
      fracture:
        group: finding                          # region | modality | finding
        synonyms: [fracture, fractur*, fx]      # case-insensitive; plurals of the last word are automatic;
                                                # a leading/trailing * matches any word characters
        abbreviations: [FX]                     # case-sensitive, optional plural "s" (so "US" never matches "us")
        implies: [extremity]                    # concepts that a mention also implies (e.g. lung -> chest)
        labels: [Broken bone]                   # class labels that mean this concept (see label_vector)

A bare mapping ``{concept: {group, synonyms, ...}}`` without the ``concepts`` key is accepted too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipmed.errors import ClipmedError
from clipmed.schema import read_mapping

GROUPS = ("region", "modality", "finding")
_CONCEPT_KEYS = {"group", "synonyms", "abbreviations", "implies", "labels"}


@dataclass(frozen=True)
class Concept:
    """One entity: its group, the words that name it, and the concepts a mention of it implies."""

    name: str
    group: str
    synonyms: tuple[str, ...] = ()
    abbreviations: tuple[str, ...] = ()
    implies: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of this concept (empty optional lists left out)."""
        out: dict[str, Any] = {"group": self.group, "synonyms": list(self.synonyms)}
        for key in ("abbreviations", "implies", "labels"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        return out


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, immutable set of concepts (hashable, so compiled extractors can be cached per vocabulary)."""

    entries: tuple[Concept, ...]
    ignore: tuple[str, ...] = ()
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.entries]
        if not names:
            raise ClipmedError(f"vocabulary {self.source} has no concepts")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ClipmedError(f"vocabulary {self.source}: duplicate concept names {dup}")
        known = set(names)
        for c in self.entries:
            if c.group not in GROUPS:
                raise ClipmedError(f"vocabulary {self.source}: concept {c.name!r} has group {c.group!r}; use one of {list(GROUPS)}")
            if not (c.synonyms or c.abbreviations):
                raise ClipmedError(f"vocabulary {self.source}: concept {c.name!r} has no synonyms or abbreviations")
            unknown = [i for i in c.implies if i not in known]
            if unknown:
                raise ClipmedError(f"vocabulary {self.source}: concept {c.name!r} implies unknown concepts {unknown}")

    @property
    def concepts(self) -> list[str]:
        """Concept names in vector-column order."""
        return [c.name for c in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.entries)

    def index(self, name: str) -> int:
        """Column of a concept in entity vectors."""
        for i, c in enumerate(self.entries):
            if c.name == name:
                return i
        raise KeyError(name)

    def group(self, group: str) -> list[str]:
        """Names of the concepts in one group (region, modality or finding)."""
        return [c.name for c in self.entries if c.group == group]

    @property
    def fingerprint(self) -> str:
        """Short hash of the contents: record it next to cached entity vectors to detect a changed vocabulary."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (``Vocabulary.from_dict(v.to_dict()) == v``); dump it with ``sort_keys=False``, since
        concept order is column order."""
        return {"ignore": list(self.ignore), "concepts": {c.name: c.to_dict() for c in self.entries}}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Vocabulary:
        """Build from parsed YAML, checking it so that mistakes fail here with a clear message."""
        if not isinstance(data, dict):
            raise ClipmedError(f"vocabulary {source} must be a mapping of concepts, got {type(data).__name__}")
        if "concepts" in data:
            concepts, ignore = data["concepts"], data.get("ignore") or []
            extra = set(data) - {"concepts", "ignore", "version"}
            if extra:
                raise ClipmedError(f"vocabulary {source}: unknown top-level keys {sorted(extra)}")
        else:
            concepts, ignore = data, []
        if not isinstance(concepts, dict):
            raise ClipmedError(f"vocabulary {source}: 'concepts' must map concept names to {{group, synonyms}}")
        entries = []
        for name, spec in concepts.items():
            if not isinstance(spec, dict) or "group" not in spec:
                raise ClipmedError(f"vocabulary {source}: concept {name!r} needs a mapping with 'group' and 'synonyms'")
            extra = set(spec) - _CONCEPT_KEYS
            if extra:
                raise ClipmedError(f"vocabulary {source}: concept {name!r} has unknown keys {sorted(extra)}")
            entries.append(
                Concept(
                    name=str(name),
                    group=str(spec["group"]),
                    synonyms=_strings(spec.get("synonyms"), source, name),
                    abbreviations=_strings(spec.get("abbreviations"), source, name),
                    implies=_strings(spec.get("implies"), source, name),
                    labels=_strings(spec.get("labels"), source, name),
                )
            )
        return cls(tuple(entries), _strings(ignore, source, "ignore"), source)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary YAML file (the ``vocabulary_path`` option)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ClipmedError(f"vocabulary file not found: {p} (check vocabulary_path)")
        data = read_mapping(p, "vocabulary", "a vocabulary is a YAML mapping of concepts")
        return cls.from_dict(data, source=str(p))

    @classmethod
    def default(cls) -> Vocabulary:
        """The radiology vocabulary shipped with clipmed (regions, modalities, findings); parsed once."""
        return _default_vocabulary()


@lru_cache(maxsize=1)
def _default_vocabulary() -> Vocabulary:
    text = resources.files("clipmed").joinpath("resources/concepts.yaml").read_text(encoding="utf-8")
    return Vocabulary.from_dict(yaml.safe_load(text), source="clipmed/resources/concepts.yaml")


def _strings(value: Any, source: str, where: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ClipmedError(f"vocabulary {source}: {where!r} must list non-empty strings")
    return tuple(v.strip() for v in value)
