"""The record every data source is read into, and the field names shared by every command."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldMap:
    """Which source field holds what. The same option names on every command (--caption-field, ...)."""

    caption_field: str = "caption"
    label_field: str | None = "body_part"
    image_field: str = "file_name"
    group_field: str | None = None
    id_field: str = "id"


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
