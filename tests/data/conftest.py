"""Fixtures for the data tests: tiny images and small datasets written in each of the four formats."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), color=None, **kwargs) -> Path:
    """Write a small solid image (PNG unless the suffix says otherwise) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        color = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "CMYK": (0, 255, 255, 0),
                 "L": 120, "LA": (120, 128), "P": 3, "1": 1}.get(mode, 0)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height: enough for PIL to read its size, no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def dataset_rows(root: Path, counts: dict[str | None, int], *, group_size: int = 1) -> list[dict]:
    """Imagefolder-style rows under `root`, `counts[label]` rows per label (None: null label), one image
    each; consecutive rows share an `article` in runs of `group_size`."""
    rows = []
    for label, count in counts.items():
        for _ in range(count):
            index = len(rows)
            name = f"images/img_{index:04d}.png"
            save_image(root / name, color=(index % 256, (index * 7) % 256, 90))
            rows.append({"file_name": name, "id": f"id{index:04d}", "caption": f"figure {index} of {label}",
                         "body_part": label, "article": f"PMC{index // group_size}",
                         "source": f"PMC figure {index}", "license": "CC BY"})
    return rows


def write_imagefolder(root: Path, rows: list[dict]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(root)


def write_pubmedvision(root: Path, rows: list[dict]) -> str:
    data = []
    for row in rows:
        entry = {key: value for key, value in row.items() if key not in ("file_name", "caption")}
        entry["image"] = [row["file_name"]] if row.get("file_name") else []
        entry["modality"] = "CT"
        entry["conversations"] = [{"from": "human", "value": "<image>\nDescribe the figure."},
                                  {"from": "gpt", "value": row.get("caption")}]
        data.append(entry)
    path = root / "pubmedvision.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def write_csv(root: Path, rows: list[dict], delimiter: str = ",") -> str:
    """open_clip's layout: `filepath` and `title` columns, plus the other fields."""
    path = root / ("data.tsv" if delimiter == "\t" else "data.csv")
    names = ["filepath", "title", "id", "body_part", "article", "source", "license"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(names)
        for row in rows:
            values = dict(row, filepath=row.get("file_name"), title=row.get("caption"))
            writer.writerow(["" if values.get(name) is None else values[name] for name in names])
    return str(path)


def write_hf(root: Path, rows: list[dict]) -> str:
    """A `save_to_disk` folder whose `image` column is an Image feature. `save_to_disk` stores the bytes
    and only the file's base name as its path."""
    import datasets

    records = []
    for row in rows:
        entry = {key: value for key, value in row.items() if key != "file_name"}
        if row.get("file_name") is None:
            entry["image"] = None
        else:
            entry["image"] = {"bytes": None, "path": str(root / row["file_name"])}
        records.append(entry)
    features = datasets.Features({
        "image": datasets.Image(), "id": datasets.Value("string"), "caption": datasets.Value("string"),
        "body_part": datasets.Value("string"), "article": datasets.Value("string"),
        "source": datasets.Value("string"), "license": datasets.Value("string")})
    out = root / "hf_dataset"
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(out))
    return str(out)


def write_webdataset(root: Path, rows: list[dict], shards: int = 2) -> str:
    """open_clip's layout: per sample a `png`, a `txt` caption (absent when null) and a `json` of the other
    fields, over `shards` tar files; returns the brace pattern naming them."""
    from webdataset import TarWriter

    per_shard = -(-len(rows) // shards)
    for number in range(shards):
        with TarWriter(str(root / f"shard-{number:05d}.tar")) as sink:
            for row in rows[number * per_shard:(number + 1) * per_shard]:
                sample = {"__key__": f"sample{row['id']}",
                          "json": {k: v for k, v in row.items() if k not in ("file_name", "caption")}}
                if row.get("caption") is not None:
                    sample["txt"] = row["caption"]
                if row.get("file_name"):
                    sample["png"] = (root / row["file_name"]).read_bytes()
                sink.write(sample)
    return str(root / f"shard-{{00000..{shards - 1:05d}}}.tar")


WRITERS: dict[str, Callable[..., str]] = {
    "imagefolder": write_imagefolder, "pubmedvision": write_pubmedvision, "csv": write_csv, "hf": write_hf,
    "webdataset": write_webdataset,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep materialised hub images out of the user's cache."""
    monkeypatch.setenv("CLIPMED_CACHE", str(tmp_path / "clipmed-cache"))


@pytest.fixture(scope="session", autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (conftest itself is not importable by name)."""
    return SimpleNamespace(save_image=save_image, png_header_only=png_header_only, rows=dataset_rows, writers=WRITERS,
                           write=lambda fmt, root, rows: WRITERS[fmt](root, rows))
