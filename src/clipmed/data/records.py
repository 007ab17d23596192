"""The record every data source is read into, and the field names shared by every command."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import option


@dataclass(frozen=True)
class FieldMap:
    """Which source field holds what. The same option names on every command (--caption-field, ...)."""

    caption_field: str = option("caption", "source field of the captions")
    label_field: str | None = option("body_part", "source field of the class labels")
    image_field: str = option("file_name", "source field of the image paths")
    group_field: str | None = option(None, "rows sharing this value never straddle splits (roco: article)")
    id_field: str = option("id", "source field of the row ids")


@dataclass(frozen=True)
class Record:
    """One row of a dataset, source-independent.

    image_path is absolute (or None when the source row names no usable image file); label is the raw value
    of the label field (cleaning into classes happens in `labels.py`); extra keeps the other scalar fields of
    the row (e.g. source and license, needed for attribution). image_fault says why a named image was refused
    before anything opened it (a path outside the dataset folder); image_path is then None.
    """

    id: str
    image_path: str | None
    caption: str | None
    label: str | None = None
    group: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    image_fault: str | None = None
