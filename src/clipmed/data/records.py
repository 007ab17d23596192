"""The record every data source is read into, the field names shared by every command, and the column-wise
table that holds many records compactly."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..options import option

if TYPE_CHECKING:
    import pyarrow as pa


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


class TextColumn(Sequence):
    """One string column of a RecordTable (or a view of some of its rows), read as a sequence of str | None."""

    def __init__(self, array: "pa.Array", rows: np.ndarray | None = None) -> None:
        self._array, self._rows = array, rows

    def __len__(self) -> int:
        return len(self._array) if self._rows is None else len(self._rows)

    def __getitem__(self, i: int) -> str | None:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._array[int(i if self._rows is None else self._rows[i])].as_py()

    def __iter__(self) -> Iterator[str | None]:
        for start in range(0, len(self), READ_CHUNK):
            yield from _rows_of(self._array, self._rows, start, start + READ_CHUNK).to_pylist()

    def take(self, positions: Sequence[int] | np.ndarray) -> "TextColumn":
        """A view of rows `positions` (of this sequence), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return TextColumn(self._array, positions if self._rows is None else self._rows[positions])

    def to_arrow(self) -> "pa.Array":
        """These rows as one Arrow string array (a copy of the view's rows; the column itself when not a view)."""
        return _rows_of(self._array, self._rows, 0, len(self))


class RecordTable(Sequence):
    """Records held column-wise in Arrow arrays, made into Record objects only when read.

    A Record per row costs kilobytes of Python objects (strings, the extra dict); here a row costs about the bytes
    of its strings, so a million-row split fits in a few hundred MB, and a view of some rows (`take`) copies
    nothing but their positions. Iteration converts a chunk at a time. `extra` is kept as JSON text.
    """

    def __init__(self, columns: dict[str, "pa.Array"], rows: np.ndarray | None = None) -> None:
        self._columns, self._rows = columns, rows

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "RecordTable":
        """A table of `records`, in order; built a chunk at a time (never a list of every row)."""
        import pyarrow as pa

        chunks: dict[str, list] = {name: [] for name in _COLUMNS}
        batch: list[Record] = []
        for record in itertools.chain(records, [None]):
            if record is not None:
                batch.append(record)
            if len(batch) == READ_CHUNK or (record is None and batch):
                for name, array in _arrays(batch).items():
                    chunks[name].append(array)
                batch = []
        return cls({name: pa.concat_arrays(arrays) if arrays else pa.array([], type=pa.string())
                    for name, arrays in chunks.items()})

    def __len__(self) -> int:
        return len(self._columns["id"]) if self._rows is None else len(self._rows)

    def __getitem__(self, i: int) -> Record:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"RecordTable indices are integers (use take for several rows), not {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = int(i if self._rows is None else self._rows[i])
        return _to_record({name: array[row].as_py() for name, array in self._columns.items()})

    def __iter__(self) -> Iterator[Record]:
        for start in range(0, len(self), READ_CHUNK):
            columns = {name: _rows_of(array, self._rows, start, start + READ_CHUNK).to_pylist()
                       for name, array in self._columns.items()}
            yield from (_to_record(dict(zip(_COLUMNS, values))) for values in zip(*columns.values()))

    def __add__(self, other: "RecordTable") -> "RecordTable":
        """The rows of both, in order (views of one table stay views; other tables are concatenated)."""
        if other._columns is self._columns:
            return RecordTable(self._columns, np.concatenate([self._positions(), other._positions()]))
        import pyarrow as pa

        return RecordTable({name: pa.concat_arrays([self._view(name), other._view(name)]) for name in _COLUMNS})

    def take(self, positions: Sequence[int] | np.ndarray) -> "RecordTable":
        """A view of rows `positions` (of this sequence), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return RecordTable(self._columns, positions if self._rows is None else self._rows[positions])

    def column(self, name: str) -> TextColumn:
        """One field of every row (id, image_path, caption, label, group, image_fault), without making Records."""
        if name not in _COLUMNS or name == "extra":
            raise KeyError(name)
        return TextColumn(self._columns[name], self._rows)

    def positions_of(self, ids: Sequence[str]) -> np.ndarray:
        """The position here of each id (the first row holding it), -1 where none does."""
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(pa.array(list(ids), type=pa.string()), value_set=self._view("id"))
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def _positions(self) -> np.ndarray:
        return np.arange(len(self._columns["id"]), dtype=np.int64) if self._rows is None else self._rows

    def _view(self, name: str) -> "pa.Array":
        return self._columns[name] if self._rows is None else self._columns[name].take(self._rows)


# Rows converted at a time when a RecordTable is built or iterated (bounded memory, few Arrow calls).
READ_CHUNK = 4096
_COLUMNS = ("id", "image_path", "caption", "label", "group", "extra", "image_fault")


def _rows_of(array: "pa.Array", rows: np.ndarray | None, start: int, stop: int) -> "pa.Array":
    """Items start..stop of a column or of a view of it (`rows`: the view's positions in the column)."""
    return array.slice(start, stop - start) if rows is None else array.take(rows[start:stop])


def _arrays(records: list[Record]) -> dict[str, "pa.Array"]:
    import pyarrow as pa

    values = {name: [getattr(r, name) for r in records] for name in _COLUMNS if name != "extra"}
    values["extra"] = [json.dumps(r.extra, ensure_ascii=False) if r.extra else None for r in records]
    return {name: pa.array(values[name], type=pa.string()) for name in _COLUMNS}


def _to_record(row: dict) -> Record:
    extra = row.pop("extra")
    return Record(**row, extra=json.loads(extra) if extra else {})
