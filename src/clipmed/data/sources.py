"""Read any of the supported dataset layouts into `Record`s, one row at a time.

Formats (autodetected from the path when `fmt` is None):

- ``imagefolder``: a folder with ``metadata.jsonl`` (Hugging Face imagefolder layout), or that file itself;
  image paths are relative to the folder.
- ``pubmedvision``: PubMedVision's JSON list (``id``, ``image`` = list of paths, ``body_part``,
  ``modality``, ``conversations``), parsed incrementally (the real file is over a GB); the caption is the
  first ``gpt`` turn unless ``caption_field`` names a real top-level field; image paths are relative to
  ``image_root`` (else the JSON's folder).
- ``csv``: CSV or TSV (the separator is read off the header line) with an image-path column and a
  caption column; open_clip's ``filepath``/``title`` are used when the default field names are absent;
  paths are relative to ``image_root`` (else the CSV's folder).
- ``hf``: a ``datasets`` dataset: a folder written by ``save_to_disk`` or a hub id (``hf:owner/name`` or
  ``owner/name`` when no such path exists). Append ``:SPLIT`` to choose a split of a DatasetDict
  (default ``train``, or the only split there is). With ``streaming`` a hub id (or a local folder of data
  files) is read as a stream, never downloaded whole. An ``Image`` column is read undecoded: its file is used
  when it exists, else its bytes are written once into clipmed's cache folder
  (``clipmed.cache.cache_dir("hf-images", fingerprint)``). A string column is a path, relative to
  ``image_root`` (else the dataset folder, or the working directory for a hub id).
- ``webdataset``: tar shards in open_clip's layout (``shard-{00000..00127}.tar``: braces are expanded, paths
  relative to the working directory or absolute), read with the ``webdataset`` package. A sample's id is its
  json's id field, else its ``__key__``; its image the first ``jpg|jpeg|png|webp`` member, its caption the
  ``txt`` member (else the json's caption field), other fields from the ``json`` member. Its locator is
  ``shard:key``. Image members are written once into clipmed's cache folder
  (``cache_dir("wds-images", fingerprint)``, file names made from sanitised keys), so every later step reads
  them as plain files like any other source's images.

Image paths must resolve (symlinks followed) inside the dataset folder, ``image_root`` or clipmed's cache
folder; a row whose image lies elsewhere keeps its caption but no image (`Record.image_fault` says why),
unless ``allow_outside_paths``.

A row missing a value (null caption, null image) still becomes a Record; `split.py` decides what is usable.
A row that cannot become a Record at all (not valid JSON, not UTF-8, not an object, a caption that is a list,
...) comes out as a `SourceRow` with a problem instead. Rows without an id get the stable id ``row-<index>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from clipmed.cache import cache_dir, cache_root
from clipmed.data.records import FieldMap, Record
from clipmed.errors import ClipmedError, first_line
from clipmed.io import atomic_write, fingerprint_files

FORMATS = ("imagefolder", "pubmedvision", "csv", "hf", "webdataset")

_DEFAULTS = FieldMap()
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_IMAGE_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"),
                (b"II*\x00", "tif"), (b"MM\x00*", "tif"), (b"RIFF", "webp"))
_WDS_IMAGES = ("jpg", "jpeg", "png", "webp")
_PROBE_ROWS = 1000  # rows read up front to check the field options before the first full pass


class SourceRow(NamedTuple):
    """One row as read: its locator (``metadata.jsonl:12``, ``data.json[3]``, ``shard.tar:key``) and either a
    Record or, for a row that could not be read, the problem."""

    locator: str
    record: Record | None
    problem: str | None = None


@dataclass
class LoadedSource:
    """A dataset opened for reading, with what is needed to find it again and to check it did not change.

    `rows()` streams it (a new pass each call; memory independent of its size). `records`, `locators` and
    `problems` hold one whole pass, for the commands that want every row in memory.
    """

    format: str
    path: str
    image_root: str | None
    fingerprint: str
    read: Callable[[], Iterator[SourceRow]] = field(repr=False)
    streaming: bool = False
    allow_outside_paths: bool = False

    def rows(self) -> Iterator[SourceRow]:
        """Every row in source order."""
        return self.read()

    @cached_property
    def _pass(self) -> tuple[list[Record], list[str], list[tuple[str, str]]]:
        records, locators, problems = [], [], []
        for row in self.rows():
            if row.record is None:
                problems.append((row.locator, row.problem))
            else:
                records.append(row.record)
                locators.append(row.locator)
        return records, locators, problems

    @property
    def records(self) -> list[Record]:
        return self._pass[0]

    @property
    def locators(self) -> list[str]:
        """Parallel to `records`, so that rejections can point at the row."""
        return self._pass[1]

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(locator, reason) of the rows that could not be read."""
        return self._pass[2]


class _RowProblem(Exception):
    """A row that cannot become a Record; the message is its reason."""


@dataclass(frozen=True)
class _Columns:
    id: str | None  # None: the source has no id column, rows get index ids
    label: str | None
    group: str | None
    used: frozenset[str]  # kept out of Record.extra


class _Keys:
    """The field names of a source's rows: the first rows' keys, and all rows' only when a name is not among
    them (so a field that exists is confirmed without a full pass, and a typo still gets the full list)."""

    def __init__(self, rows: Callable[[], Iterable[Any]]) -> None:
        self._rows = rows
        self._known = self._union(islice(rows(), _PROBE_ROWS))
        self._complete = False

    @staticmethod
    def _union(rows: Iterable[Any]) -> set[str]:
        keys: set[str] = set()
        for row in rows:
            if isinstance(row, dict):
                keys.update(row)
        return keys

    def __contains__(self, name: object) -> bool:
        return name in self._known or name in self.all()

    def probed(self, name: str) -> bool:
        """Whether the first rows have `name` (no full pass: for choices between alternatives)."""
        return name in self._known

    def all(self) -> set[str]:
        if not self._complete:
            self._known |= self._union(self._rows())
            self._complete = True
        return self._known


class _PathPolicy:
    """Where image files may live: inside the given roots (symlinks followed) unless outside paths are allowed."""

    def __init__(self, roots: Iterable[str | os.PathLike | None], allow_outside: bool) -> None:
        self.allow_outside = allow_outside
        self.roots = tuple(os.path.realpath(root) for root in {*roots, cache_root()} if root)
        self._real_dirs: dict[str, str] = {}

    def fault(self, path: str) -> str | None:
        """Why the absolute `path` is refused (None: allowed). Directories are resolved once each."""
        if self.allow_outside:
            return None
        parent, name = os.path.split(path)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if any(real == root or real.startswith(root + os.sep) for root in self.roots):
            return None
        return (f"image path outside the dataset folder: {path} (allowed: the dataset folder, --image-root and "
                f"clipmed's cache; pass --allow-outside-paths to accept it)")


def detect_format(path: str) -> str:
    """Guess the format of `path` (see the module docstring); ClipmedError when it cannot tell."""
    if path.startswith("hf:"):
        return "hf"
    if path.lower().endswith(".tar") or (".tar" in path.lower() and "{" in path):
        return "webdataset"
    p = Path(path)
    if p.is_dir():
        if (p / "metadata.jsonl").is_file():
            return "imagefolder"
        if any((p / name).is_file() for name in ("state.json", "dataset_dict.json")):
            return "hf"
        raise ClipmedError(
            f"{path}: cannot tell the dataset format (no metadata.jsonl, no saved `datasets` dataset); "
            f"pass --format with one of {', '.join(FORMATS)}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return "imagefolder"
        if suffix == ".json":
            return "pubmedvision"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise ClipmedError(f"{path}: cannot tell the dataset format from the file name; "
                           f"pass --format with one of {', '.join(FORMATS)}")
    head, sep, _ = path.rpartition(":")
    if (sep and Path(head).is_dir()) or _HUB_ID.fullmatch(head if sep else path):
        return "hf"
    raise ClipmedError(f"{path}: no such file or folder (nor a Hugging Face dataset id like owner/name)")


def load_source(path: str, *, fmt: str | None = None, fields: FieldMap = _DEFAULTS,
                image_root: str | None = None, streaming: bool = False,
                allow_outside_paths: bool = False) -> LoadedSource:
    """Open the dataset at `path` for reading (format autodetected unless `fmt` is given).

    The field options are checked here (a ClipmedError names what exists); rows are read by
    `LoadedSource.rows()`. `streaming` applies to Hugging Face hub ids (and folders of data files).
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ClipmedError(f"unknown dataset format '{fmt}'; use one of {', '.join(FORMATS)}")
    if streaming and fmt != "hf":
        raise ClipmedError(f"--streaming reads Hugging Face datasets; {path} is a {fmt} source, read as a stream "
                           f"already: drop --streaming")
    image_root = os.path.abspath(image_root) if image_root else None
    if image_root and not os.path.isdir(image_root):
        raise ClipmedError(f"--image-root {image_root} is not a folder")
    if fmt == "hf":
        return _load_hf(path, fields, image_root, streaming, allow_outside_paths)
    loader = {"imagefolder": _load_imagefolder, "pubmedvision": _load_pubmedvision,
              "csv": _load_csv, "webdataset": _load_webdataset}[fmt]
    return loader(path, fields, image_root, allow_outside_paths)


# --- imagefolder --------------------------------------------------------------------------------

def _load_imagefolder(path: str, fields: FieldMap, image_root: str | None, allow_outside: bool) -> LoadedSource:
    given = Path(path)
    meta = given if given.is_file() else given / "metadata.jsonl"
    if not meta.is_file():
        raise ClipmedError(f"{path}: no metadata.jsonl (the imagefolder layout needs one, with one JSON "
                           f"object per image); pass --format if this is another layout")
    rows = lambda: _jsonl_rows(meta)  # noqa: E731
    columns = _Keys(lambda: (row for _, row in rows()))
    image_col = _require(columns, fields.image_field, "image path", "--image-field", meta)
    caption_col = _require(columns, fields.caption_field, "caption", "--caption-field", meta)
    return _path_and_caption_source(rows, _columns(columns, fields, meta, image_col, caption_col), image_col,
                                    caption_col, "imagefolder", path, meta, image_root, allow_outside)


def _jsonl_rows(meta: Path) -> Iterator[tuple[str, Any]]:
    """(locator, object) per non-blank line; a line that is not UTF-8 or not JSON is a _RowProblem."""
    with open(meta, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            locator = f"{meta.name}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield locator, _RowProblem(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                           f"{exc.start + 1}); save {meta.name} as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield locator, json.loads(line)
            except ValueError as exc:  # JSONDecodeError, or a number too long to convert
                yield locator, _RowProblem(f"not valid JSON ({getattr(exc, 'msg', exc)})")


def _path_and_caption_source(rows: Callable[[], Iterable[tuple[str, Any]]], cols: _Columns, image_col: str,
                             caption_col: str, fmt: str, path: str, file: Path, image_root: str | None,
                             allow_outside: bool) -> LoadedSource:
    """A source whose rows name an image path (relative to image_root, else the file's folder) and a caption."""
    folder = str(file.parent.resolve())
    base = image_root or folder

    def read() -> Iterator[SourceRow]:
        return _records(rows(), cols, _PathPolicy((folder, image_root), allow_outside),
                        image_of=lambda row, _id: _path_value(row.get(image_col), base),
                        caption_of=lambda row: _text(row.get(caption_col), "caption"))

    return LoadedSource(fmt, os.path.abspath(path), image_root, fingerprint_files([file]), read,
                        allow_outside_paths=allow_outside)


# --- PubMedVision -------------------------------------------------------------------------------

def _load_pubmedvision(path: str, fields: FieldMap, image_root: str | None, allow_outside: bool) -> LoadedSource:
    file = Path(path)
    if not file.is_file():
        raise ClipmedError(f"{path}: not a file (PubMedVision data is one JSON file)")
    rows = lambda: _json_list_items(file)  # noqa: E731
    columns = _Keys(lambda: (row for _, row in rows()))
    # PubMedVision names its fields `image` and `conversations`; they stand in for the FieldMap
    # defaults when the file has no field of the default name.
    image_col = _default_or(columns, fields.image_field, _DEFAULTS.image_field, "image")
    _require(columns, image_col, "image path", "--image-field", file)
    caption_col = _default_or(columns, fields.caption_field, _DEFAULTS.caption_field, "conversations")
    _require(columns, caption_col, "caption", "--caption-field", file)
    if caption_col == "conversations" and fields.caption_field != "conversations":
        caption_of = lambda row: _gpt_turn(row.get(caption_col))  # noqa: E731
    else:
        caption_of = lambda row: _text(row.get(caption_col), "caption")  # noqa: E731
    cols = _columns(columns, fields, file, image_col, caption_col)
    folder = str(file.parent.resolve())
    base = image_root or folder

    def read() -> Iterator[SourceRow]:
        return _records(rows(), cols, _PathPolicy((folder, image_root), allow_outside),
                        image_of=lambda row, _id: _path_value(_first(row.get(image_col)), base),
                        caption_of=caption_of)

    return LoadedSource("pubmedvision", os.path.abspath(path), image_root, fingerprint_files([file]), read,
                        allow_outside_paths=allow_outside)


def _json_list_items(file: Path) -> Iterator[tuple[str, Any]]:
    """(locator, item) for each element of the top-level JSON list, parsed incrementally with ijson."""
    import ijson  # only for this format

    with open(file, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head and not head.startswith(b"["):
            raise ClipmedError(f"{file}: expected a JSON list of records (the PubMedVision layout), found "
                               f"a JSON {'object' if head.startswith(b'{') else 'value'}")
        handle.seek(0)
        index = -1
        try:
            for index, item in enumerate(ijson.items(handle, "item", use_float=True)):
                yield f"{file.name}[{index}]", item
        except ijson.JSONError as exc:
            raise ClipmedError(f"{file}: not valid JSON after record {index} ({first_line(exc)}); PubMedVision "
                               f"data is one JSON list of records") from None


def _first(value: Any) -> Any:
    """PubMedVision rows list one or more images; the first is the figure the caption describes."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _gpt_turn(conversations: Any) -> str | None:
    if conversations is None:
        return None
    if not isinstance(conversations, list):
        raise _RowProblem("conversations is not a list of turns")
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            return _text(turn.get("value"), "caption")
    return None


# --- CSV / TSV ----------------------------------------------------------------------------------

def _load_csv(path: str, fields: FieldMap, image_root: str | None, allow_outside: bool) -> LoadedSource:
    file = Path(path)
    if not file.is_file():
        raise ClipmedError(f"{path}: not a file")
    header, delimiter = _csv_header(file)
    columns = set(header)
    image_col = _default_or(columns, fields.image_field, _DEFAULTS.image_field, "filepath")
    caption_col = _default_or(columns, fields.caption_field, _DEFAULTS.caption_field, "title")
    _require(columns, image_col, "image path", "--image-field", file)
    _require(columns, caption_col, "caption", "--caption-field", file)
    return _path_and_caption_source(lambda: _csv_rows(file, header, delimiter),
                                    _columns(columns, fields, file, image_col, caption_col), image_col,
                                    caption_col, "csv", path, file, image_root, allow_outside)


def _open_csv(file: Path):
    # surrogateescape: bytes that are not UTF-8 survive decoding, so the row holding them can be skipped
    return open(file, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _csv_header(file: Path) -> tuple[list[str], str]:
    with _open_csv(file) as handle:
        first_line_text = handle.readline()
        handle.seek(0)
        # open_clip writes tab-separated files named .csv, so the header decides, not the suffix.
        delimiter = "\t" if first_line_text.count("\t") > first_line_text.count(",") else ","
        header = next(csv.reader(handle, delimiter=delimiter), [])
    if not all(_is_unicode(name) for name in header):
        raise ClipmedError(f"{file}:1: the header line is not UTF-8 text; save the file as UTF-8")
    return header, delimiter


def _csv_rows(file: Path, header: list[str], delimiter: str) -> Iterator[tuple[str, Any]]:
    with _open_csv(file) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)
        line = reader.line_num
        for values in reader:
            locator, line = f"{file.name}:{line + 1}", reader.line_num
            if not values:
                continue
            if not all(_is_unicode(value) for value in values):
                yield locator, _RowProblem(f"not UTF-8 text; save {file.name} as UTF-8")
            elif len(values) > len(header):
                yield locator, _RowProblem(f"{len(values)} fields but the header has {len(header)}")
            else:
                yield locator, dict(zip(header, values + [None] * (len(header) - len(values))))


def _is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (undecodable bytes, or JSON escapes no file can store)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- Hugging Face datasets ----------------------------------------------------------------------

def _load_hf(path: str, fields: FieldMap, image_root: str | None, streaming: bool,
             allow_outside: bool) -> LoadedSource:
    import datasets  # heavy import, only for this format

    name, split, local = _parse_hf(path)
    try:
        if streaming:
            obj = datasets.load_dataset(name, split=split or "train", streaming=True)
            split = split or "train"
        elif local:
            obj = datasets.load_from_disk(name)
        else:
            obj = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (not found, offline, bad folder)
        where = name if local else f"Hugging Face dataset '{name}'"
        raise ClipmedError(f"could not load {where}: {type(exc).__name__}: {first_line(exc)}") from None
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        chosen = split or ("train" if "train" in obj else (names[0] if len(names) == 1 else ""))
        if chosen not in obj:
            raise ClipmedError(f"{path}: choose a split as {path}:SPLIT (splits: {', '.join(names)})")
        ds, split = obj[chosen], chosen
    elif split and local and not streaming:
        raise ClipmedError(f"{path}: {name} is a single dataset without splits; drop ':{split}'")
    else:
        ds = obj
    spec = (name if local else f"hf:{name}") + (f":{split}" if split else "")
    where = name if local else f"hf:{name}"

    if streaming:
        fingerprint = (fingerprint_files(_data_files(name)) if local
                       else _hub_fingerprint(name, split))
        rows = lambda: ((f"row {index}", row) for index, row in enumerate(ds))  # noqa: E731
        columns: Any = set(ds.column_names) if ds.column_names else _Keys(lambda: (row for _, row in rows()))
    else:
        cache_files = [entry["filename"] for entry in ds.cache_files]
        fingerprint = fingerprint_files(cache_files) if cache_files else ds._fingerprint
        rows = lambda: _hf_rows(ds)  # noqa: E731
        columns = set(ds.column_names)
    # Datasets built by `datasets` itself (imagefolder, hub) name their Image column `image`.
    image_col = _default_or(columns, fields.image_field, _DEFAULTS.image_field, "image")
    _require(columns, image_col, "image", "--image-field", where)
    caption_col = _require(columns, fields.caption_field, "caption", "--caption-field", where)
    cols = _columns(columns, fields, where, image_col, caption_col)

    feature = ds.features[image_col] if ds.features and image_col in ds.features else None
    folder = name if local else os.getcwd()
    base = image_root or folder
    policy = _PathPolicy((folder, image_root), allow_outside)
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        images = cache_dir("hf-images", fingerprint)
        image_of = lambda row, rec_id: _hf_image(row.get(image_col), rec_id, base, images, policy)  # noqa: E731
    elif feature is None or (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        image_of = lambda row, _id: _path_value(row.get(image_col), base)  # noqa: E731
    else:
        raise ClipmedError(f"{where}: column '{image_col}' holds {feature}, not images or file paths; "
                           f"pass --image-field with the image column")

    def read() -> Iterator[SourceRow]:
        return _records(rows(), cols, policy, image_of=image_of,
                        caption_of=lambda row: _text(row.get(caption_col), "caption"))

    return LoadedSource("hf", spec, image_root, fingerprint, read, streaming=streaming,
                        allow_outside_paths=allow_outside)


def _parse_hf(path: str) -> tuple[str, str | None, bool]:
    """(folder or hub id, split or None, is local) from ``[hf:]PATH_OR_ID[:SPLIT]``."""
    spec = path[3:] if path.startswith("hf:") else path
    if os.path.exists(spec):
        return os.path.abspath(spec), None, True
    head, sep, split = spec.rpartition(":")
    if sep and split and os.path.exists(head):
        return os.path.abspath(head), split, True
    if sep and split and _HUB_ID.fullmatch(head):
        return head, split, False
    if _HUB_ID.fullmatch(spec):
        return spec, None, False
    raise ClipmedError(f"{path}: no such folder, and not a Hugging Face dataset id (owner/name[:split])")


def _data_files(folder: str) -> list[Path]:
    """The files of a local data folder read by streaming, in a fixed order (hidden files left out)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _hub_fingerprint(name: str, split: str | None) -> str:
    """A hub dataset streamed is named by its commit: the same revision streams the same rows."""
    from huggingface_hub import HfApi

    try:
        revision = HfApi().dataset_info(name).sha
    except Exception as exc:  # offline, not found, gated: all say the same to the user
        raise ClipmedError(f"could not look up Hugging Face dataset '{name}': {type(exc).__name__}: "
                           f"{first_line(exc)}") from None
    return hashlib.sha256(f"hf:{name}:{split}@{revision}".encode()).hexdigest()


def _hf_rows(ds: Any) -> Iterator[tuple[str, dict]]:
    index = 0
    for batch in ds.iter(batch_size=512):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield f"row {index}", dict(zip(names, values))
            index += 1


def _hf_image(value: Any, rec_id: str, base: str, images: Path, policy: _PathPolicy) -> str | None:
    """A local file for an undecoded Image value: its own path when that exists where images may be read,
    else its bytes, cached."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _RowProblem("image value is not an Image feature")
    original = value.get("path")
    data = value.get("bytes")
    if original:
        candidate = os.path.abspath(os.path.join(base, original))
        if os.path.isfile(candidate) and not (data and policy.fault(candidate)):
            return candidate
    if not data:
        return _path_value(original, base)  # a dangling path: validation reports it as missing
    suffix = Path(original).suffix.lower().lstrip(".") if original else ""
    return _materialise(images, rec_id, suffix, data)


def _materialise(folder: Path, name: str, suffix: str, data: bytes) -> str:
    """Write image bytes once per cache entry (atomically) under a sanitised name; return the file's path."""
    ext = suffix or next((ext for magic, ext in _IMAGE_MAGIC if data.startswith(magic)), "img")
    target = folder / f"{_safe_name(name)}.{ext}"
    if not target.is_file():
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return str(target)


def _safe_name(rec_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", rec_id)[:100].lstrip(".") or "_"
    if safe != rec_id:  # keep distinct ids distinct after the substitution
        safe += "-" + hashlib.sha256(rec_id.encode()).hexdigest()[:10]
    return safe


# --- webdataset ---------------------------------------------------------------------------------

def _load_webdataset(path: str, fields: FieldMap, image_root: str | None, allow_outside: bool) -> LoadedSource:
    import braceexpand  # a dependency of webdataset

    path = "::".join(os.path.abspath(part) for part in path.split("::"))  # later steps may run elsewhere
    shards = [shard for part in path.split("::") for shard in braceexpand.braceexpand(part)]
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise ClipmedError(f"{path}: {len(missing)} of {len(shards)} shards are not files (e.g. {missing[0]}); "
                           f"shard paths are relative to the working directory or absolute")
    fingerprint = fingerprint_files(shards)
    images = cache_dir("wds-images", fingerprint)
    rows = lambda: _wds_rows(shards, images)  # noqa: E731
    columns = _Keys(lambda: (row for _, row in rows()))
    cols = _columns(columns, fields, path, "__image__", fields.caption_field)
    caption_field = fields.caption_field

    def read() -> Iterator[SourceRow]:
        return _records(rows(), cols, _PathPolicy((image_root,), allow_outside),
                        image_of=lambda row, _id: row.get("__image__"),
                        caption_of=lambda row: _text(row["__caption__"] if row.get("__caption__") is not None
                                                     else row.get(caption_field), "caption"),
                        key="__key__")

    return LoadedSource("webdataset", path, image_root, fingerprint, read, allow_outside_paths=allow_outside)


def _wds_rows(shards: list[str], images: Path) -> Iterator[tuple[str, Any]]:
    """(``shard:key``, row) per sample: the json's fields plus __key__, __caption__ and __image__ (the image
    member materialised as a file). An unreadable shard or member is a _RowProblem."""
    from webdataset.tariterators import tarfile_samples

    for number, shard in enumerate(shards):
        name = os.path.basename(shard)
        errors: list[BaseException] = []  # what webdataset hands its handler; reading goes on after each
        for sample in tarfile_samples([{"url": shard}], handler=lambda exc, seen=errors: seen.append(exc) or True):
            yield from _tar_problems(name, errors)
            yield f"{name}:{sample['__key__']}", _wds_row(sample, number, images)
        yield from _tar_problems(name, errors)


def _tar_problems(name: str, errors: list[BaseException]) -> Iterator[tuple[str, _RowProblem]]:
    while errors:
        exc = errors.pop(0)
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        yield name, _RowProblem(f"unreadable tar data: {message.splitlines()[0] if message else ''}")


def _wds_row(sample: dict, shard_number: int, images: Path) -> dict | _RowProblem:
    row: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except ValueError as exc:  # also UnicodeDecodeError
            return _RowProblem(f"json member is not valid UTF-8 JSON ({first_line(exc)})")
        if not isinstance(meta, dict):
            return _RowProblem("json member is not an object")
        row.update(meta)
    key = sample["__key__"]
    row["__key__"] = key
    if "txt" in sample:
        try:
            row["__caption__"] = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return _RowProblem("txt member is not UTF-8 text")
    suffix = next((ext for ext in _WDS_IMAGES if ext in sample), None)
    if suffix is not None:
        row["__image__"] = _materialise(images, f"{shard_number}-{key}", suffix, sample[suffix])
    return row


# --- shared row handling ------------------------------------------------------------------------

def _seen(columns: Any, name: str) -> bool:
    """Whether the source has field `name`, judged on the first rows of a streamed source."""
    return columns.probed(name) if isinstance(columns, _Keys) else name in columns


def _default_or(columns: Any, name: str, default: str, alternative: str) -> str:
    """`alternative` (a layout's own name for a field) when the default field name is absent."""
    if name == default and not _seen(columns, name) and _seen(columns, alternative):
        return alternative
    return name


def _require(columns: Any, name: str, role: str, option: str, where: Any) -> str:
    """`name` when the source has that field, else a ClipmedError that says what exists and what to pass.

    A source without any row has no fields to check; it fails later for having nothing usable.
    """
    if name in columns:
        return name
    present = set(columns.all() if isinstance(columns, _Keys) else columns)
    if not present:
        return name
    raise ClipmedError(f"{where}: no field '{name}' for the {role} (fields: {', '.join(sorted(present))}); "
                       f"pass {option} with the field that holds it")


def _columns(columns: Any, fields: FieldMap, where: Any, image_col: str, caption_col: str) -> _Columns:
    label = group = None
    if fields.label_field is not None:
        label = _require(columns, fields.label_field, "label", "--label-field", where)
    if fields.group_field is not None:
        group = _require(columns, fields.group_field, "group", "--group-field", where)
    id_col = fields.id_field if _seen(columns, fields.id_field) else None
    used = frozenset(c for c in (id_col, label, group, image_col, caption_col) if c)
    return _Columns(id_col, label, group, used)


def _records(rows: Iterable[tuple[str, Any]], cols: _Columns, paths: _PathPolicy,
             image_of: Callable[[dict, str], str | None], caption_of: Callable[[dict], str | None],
             key: str | None = None) -> Iterator[SourceRow]:
    """SourceRows from (locator, raw row) pairs; `key` names a fallback id field (webdataset's __key__)."""
    for index, (locator, row) in enumerate(rows):
        try:
            if isinstance(row, _RowProblem):
                raise row
            if not isinstance(row, dict):
                raise _RowProblem("row is not an object")
            rec_id = _text(row.get(cols.id), "id") if cols.id else None
            rec_id = rec_id or (row[key] if key else f"row-{index}")
            image = image_of(row, rec_id)
            fault = paths.fault(image) if image else None
            record = Record(
                id=rec_id,
                image_path=None if fault else image,
                caption=caption_of(row),
                label=_label_text(row.get(cols.label), "label") if cols.label else None,
                group=_label_text(row.get(cols.group), "group") if cols.group else None,
                extra={k: v for k, v in row.items()
                       if k not in cols.used and not k.startswith("__") and _is_scalar(v)},
                image_fault=fault,
            )
        except _RowProblem as exc:
            yield SourceRow(locator, None, str(exc))
            continue
        yield SourceRow(locator, record)


def _is_scalar(value: Any) -> bool:
    """Values kept in Record.extra: plain JSON scalars, text only when it can be written back out."""
    return value is None or isinstance(value, (int, float, bool)) or (isinstance(value, str) and _is_unicode(value))


def _text(value: Any, what: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not _is_unicode(value):
            raise _RowProblem(f"{what} is not valid Unicode")
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise _RowProblem(f"{what} is a {type(value).__name__}, not text")


def _label_text(value: Any, what: str) -> str | None:
    """Labels and groups as text; a structured value becomes its JSON, which no class will match."""
    if isinstance(value, (list, dict)):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return _text(value, what)


def _path_value(value: Any, base: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _RowProblem(f"image path is a {type(value).__name__}, not text")
    if not _is_unicode(value):  # a lone surrogate escape (JSON "\ud800") can name no file and cannot be written out
        raise _RowProblem("image path is not valid Unicode")
    return os.path.abspath(os.path.join(base, value))
