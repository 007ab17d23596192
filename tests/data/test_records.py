"""RecordTable: the column-wise rows of a prepared split read back exactly as the Records that went in."""

from __future__ import annotations

import pytest

from clipmed.data import records as records_module
from clipmed.data.records import Record, RecordTable


def _records(n: int) -> list[Record]:
    return [Record(f"r{i}", f"/data/{i}.png" if i % 3 else None, None if i % 7 == 0 else f"caption é {i}",
                   "Chest" if i % 2 else None, f"g{i // 4}", {"license": "CC BY", "page": i} if i % 5 else {},
                   "outside the dataset folder" if i % 11 == 0 else None) for i in range(n)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 4 rows, so that building and iterating cross chunk edges."""
    monkeypatch.setattr(records_module, "READ_CHUNK", 4)


def test_records_round_trip_in_order_with_every_field():
    rows = _records(23)
    table = RecordTable.from_records(iter(rows))  # a stream: no list of every row needed
    assert len(table) == 23 and list(table) == rows
    assert [r.extra for r in table] == [r.extra for r in rows]  # extra is not compared by Record's ==
    assert table[0] == rows[0] and table[-1] == rows[-1] and table[13].extra == {"license": "CC BY", "page": 13}


def test_views_take_concatenate_and_read_columns_without_copying_rows():
    rows = _records(30)
    table = RecordTable.from_records(rows)
    view = table.take([29, 3, 17, 3])
    assert list(view) == [rows[29], rows[3], rows[17], rows[3]] and view[1] == rows[3]
    assert list(view.take([3, 0])) == [rows[3], rows[29]]  # a view of a view keeps the original rows
    assert list(view + table.take([0])) == [rows[29], rows[3], rows[17], rows[3], rows[0]]
    assert list(table.column("caption")) == [r.caption for r in rows]
    captions = view.column("caption")
    assert len(captions) == 4 and captions[2] == rows[17].caption and list(captions.take([1])) == [rows[3].caption]
    assert captions.to_arrow().to_pylist() == [r.caption for r in (rows[29], rows[3], rows[17], rows[3])]
    assert list(table.positions_of(["r5", "missing", "r0"])) == [5, -1, 0]


def test_tables_of_other_rows_concatenate_and_an_empty_table_is_empty():
    first, second = RecordTable.from_records(_records(6)), RecordTable.from_records(_records(9)[6:])
    assert list(first + second) == _records(9)
    empty = RecordTable.from_records([])
    assert len(empty) == 0 and list(empty) == [] and list(empty + first.take([2])) == [_records(6)[2]]


def test_indexing_is_checked():
    table = RecordTable.from_records(_records(3))
    with pytest.raises(IndexError):
        table[3]
    with pytest.raises(TypeError, match="use take"):
        table[0:2]
    with pytest.raises(IndexError):
        table.column("id")[5]
