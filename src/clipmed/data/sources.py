"""Read any of the four supported dataset layouts into `Record`s.

Formats (autodetected from the path when `fmt` is None):

- ``imagefolder``: a folder with ``metadata.jsonl`` (Hugging Face imagefolder layout), or that file itself;
  image paths are relative to the folder.
- ``pubmedvision``: PubMedVision's JSON list (``id``, ``image`` = list of paths, ``body_part``,
  ``modality``, ``conversations``); the caption is the first ``gpt`` turn unless ``caption_field``
  names a real top-level field; image paths are relative to ``image_root`` (else the JSON's folder).
- ``csv``: CSV or TSV (the separator is read off the header line) with an image-path column and a
  caption column; open_clip's ``filepath``/``title`` are used when the default field names are absent;
  paths are relative to ``image_root`` (else the CSV's folder).
- ``hf``: a ``datasets`` dataset: a folder written by ``save_to_disk`` or a hub id (``hf:owner/name`` or
  ``owner/name`` when no such path exists). Append ``:SPLIT`` to choose a split of a DatasetDict
  (default ``train``, or the only split there is). An ``Image`` column is read undecoded: its file is used
  when it exists, else its bytes are written once to
  ``${CLIPMED_CACHE:-~/.cache/clipmed}/hf-images/<fingerprint>/<id>.<ext>``. A string column is a path,
  relative to ``image_root`` (else the dataset folder, or the working directory for a hub id).

A row missing a value (null caption, null image) still becomes a Record; `split.py` decides what is usable.
A row that cannot become a Record at all (not an object, a caption that is a list, ...) is listed in
`LoadedSource.problems`. Rows without an id get the stable id ``row-<index>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipmed.data.records import FieldMap, Record
from clipmed.errors import ClipmedError
from clipmed.io import atomic_write, fingerprint_files

FORMATS = ("imagefolder", "pubmedvision", "csv", "hf")

_DEFAULTS = FieldMap()
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_IMAGE_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"),
                (b"II*\x00", "tif"), (b"MM\x00*", "tif"), (b"RIFF", "webp"))


@dataclass
class LoadedSource:
    """A dataset read into Records, with what is needed to find it again and to check it did not change.

    `locators` runs parallel to `records` (``metadata.jsonl:12``, ``data.json[3]``, ``row 7``) so that
    rejections can point at the row; `problems` holds (locator, reason) for rows that were not parsed.
    """

    records: list[Record]
    format: str
    path: str
    image_root: str | None
    fingerprint: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    locators: list[str] = field(default_factory=list)


class _RowProblem(Exception):
    """A row that cannot become a Record; the message is its reason."""


@dataclass(frozen=True)
class _Columns:
    id: str | None  # None: the source has no id column, rows get index ids
    label: str | None
    group: str | None
    used: frozenset[str]  # kept out of Record.extra


def detect_format(path: str) -> str:
    """Guess the format of `path` (see the module docstring); ClipmedError when it cannot tell."""
    if path.startswith("hf:"):
        return "hf"
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
                image_root: str | None = None) -> LoadedSource:
    """Read the dataset at `path` into Records (format autodetected unless `fmt` is given)."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ClipmedError(f"unknown dataset format '{fmt}'; use one of {', '.join(FORMATS)}")
    image_root = os.path.abspath(image_root) if image_root else None
    if image_root and not os.path.isdir(image_root):
        raise ClipmedError(f"--image-root {image_root} is not a folder")
    loader = {"imagefolder": _load_imagefolder, "pubmedvision": _load_pubmedvision,
              "csv": _load_csv, "hf": _load_hf}[fmt]
    return loader(path, fields, image_root)


# --- imagefolder --------------------------------------------------------------------------------

def _load_imagefolder(path: str, fields: FieldMap, image_root: str | None) -> LoadedSource:
    given = Path(path)
    meta = given if given.is_file() else given / "metadata.jsonl"
    if not meta.is_file():
        raise ClipmedError(f"{path}: no metadata.jsonl (the imagefolder layout needs one, with one JSON "
                           f"object per image); pass --format if this is another layout")
    rows = []
    with open(meta, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{meta.name}:{lineno}", json.loads(line)))
            except ValueError as exc:  # JSONDecodeError, or a number too long to convert
                raise ClipmedError(f"{meta}:{lineno}: not valid JSON ({getattr(exc, 'msg', exc)}); fix or "
                                   f"delete that line (metadata.jsonl needs one JSON object per line)") from None
    columns = _union_keys(row for _, row in rows)
    image_col = _require(columns, fields.image_field, "image path", "--image-field", meta)
    caption_col = _require(columns, fields.caption_field, "caption", "--caption-field", meta)
    return _path_and_caption_source(rows, _columns(columns, fields, meta, image_col, caption_col), image_col,
                                    caption_col, "imagefolder", path, meta, image_root)


def _path_and_caption_source(rows: list[tuple[str, Any]], cols: "_Columns", image_col: str, caption_col: str,
                             fmt: str, path: str, file: Path, image_root: str | None) -> LoadedSource:
    """A source whose rows name an image path (relative to image_root, else the file's folder) and a caption."""
    base = image_root or str(file.parent.resolve())
    records, locators, problems = _build(
        rows, cols,
        image_of=lambda row, _id: _path_value(row.get(image_col), base),
        caption_of=lambda row: _text(row.get(caption_col), "caption"))
    return LoadedSource(records, fmt, os.path.abspath(path), image_root, fingerprint_files([file]), problems, locators)


# --- PubMedVision -------------------------------------------------------------------------------

def _load_pubmedvision(path: str, fields: FieldMap, image_root: str | None) -> LoadedSource:
    file = Path(path)
    if not file.is_file():
        raise ClipmedError(f"{path}: not a file (PubMedVision data is one JSON file)")
    with open(file, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ClipmedError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}); "
                               f"PubMedVision data is one JSON list of records") from None
        except ValueError as exc:  # a number too long to convert
            raise ClipmedError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ClipmedError(f"{file}: expected a JSON list of records (the PubMedVision layout), "
                           f"found a JSON {type(data).__name__}")
    rows = [(f"{file.name}[{index}]", row) for index, row in enumerate(data)]
    columns = _union_keys(data)
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
    base = image_root or str(file.parent.resolve())
    records, locators, problems = _build(
        rows, cols, image_of=lambda row, _id: _path_value(_first(row.get(image_col)), base),
        caption_of=caption_of)
    return LoadedSource(records, "pubmedvision", os.path.abspath(path), image_root,
                        fingerprint_files([file]), problems, locators)


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

def _load_csv(path: str, fields: FieldMap, image_root: str | None) -> LoadedSource:
    file = Path(path)
    if not file.is_file():
        raise ClipmedError(f"{path}: not a file")
    rows: list[tuple[str, Any]] = []
    with open(file, newline="", encoding="utf-8-sig") as handle:
        first_line = handle.readline()
        handle.seek(0)
        # open_clip writes tab-separated files named .csv, so the header decides, not the suffix.
        delimiter = "\t" if first_line.count("\t") > first_line.count(",") else ","
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, [])
        line = reader.line_num
        for values in reader:
            locator, line = f"{file.name}:{line + 1}", reader.line_num
            if not values:
                continue
            if len(values) > len(header):
                rows.append((locator, _RowProblem(f"{len(values)} fields but the header has {len(header)}")))
            else:
                rows.append((locator, dict(zip(header, values + [None] * (len(header) - len(values))))))
    columns = set(header)
    image_col = _default_or(columns, fields.image_field, _DEFAULTS.image_field, "filepath")
    caption_col = _default_or(columns, fields.caption_field, _DEFAULTS.caption_field, "title")
    _require(columns, image_col, "image path", "--image-field", file)
    _require(columns, caption_col, "caption", "--caption-field", file)
    return _path_and_caption_source(rows, _columns(columns, fields, file, image_col, caption_col), image_col,
                                    caption_col, "csv", path, file, image_root)


# --- Hugging Face datasets ----------------------------------------------------------------------

def _load_hf(path: str, fields: FieldMap, image_root: str | None) -> LoadedSource:
    import datasets  # heavy import, only for this format

    name, split, local = _parse_hf(path)
    try:
        if local:
            obj = datasets.load_from_disk(name)
        else:
            obj = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (not found, offline, bad folder)
        where = name if local else f"Hugging Face dataset '{name}'"
        raise ClipmedError(f"could not load {where}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        chosen = split or ("train" if "train" in obj else (names[0] if len(names) == 1 else ""))
        if chosen not in obj:
            raise ClipmedError(f"{path}: choose a split as {path}:SPLIT (splits: {', '.join(names)})")
        ds, split = obj[chosen], chosen
    elif split and local:
        raise ClipmedError(f"{path}: {name} is a single dataset without splits; drop ':{split}'")
    else:
        ds = obj
    spec = (name if local else f"hf:{name}") + (f":{split}" if split else "")

    columns = set(ds.column_names)
    where = name if local else f"hf:{name}"
    # Datasets built by `datasets` itself (imagefolder, hub) name their Image column `image`.
    image_col = _default_or(columns, fields.image_field, _DEFAULTS.image_field, "image")
    _require(columns, image_col, "image", "--image-field", where)
    caption_col = _require(columns, fields.caption_field, "caption", "--caption-field", where)
    cols = _columns(columns, fields, where, image_col, caption_col)

    cache_files = [entry["filename"] for entry in ds.cache_files]
    fingerprint = fingerprint_files(cache_files) if cache_files else ds._fingerprint
    feature = ds.features[image_col]
    base = image_root or (name if local else os.getcwd())
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        cache_dir = _cache_root() / "hf-images" / fingerprint
        image_of = lambda row, rec_id: _hf_image(row.get(image_col), rec_id, base, cache_dir)  # noqa: E731
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        image_of = lambda row, _id: _path_value(row.get(image_col), base)  # noqa: E731
    else:
        raise ClipmedError(f"{where}: column '{image_col}' holds {feature}, not images or file paths; "
                           f"pass --image-field with the image column")
    records, locators, problems = _build(
        _hf_rows(ds), cols, image_of=image_of,
        caption_of=lambda row: _text(row.get(caption_col), "caption"))
    return LoadedSource(records, "hf", spec, image_root, fingerprint, problems, locators)


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


def _hf_rows(ds: Any) -> Iterable[tuple[str, dict]]:
    index = 0
    for batch in ds.iter(batch_size=512):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield f"row {index}", dict(zip(names, values))
            index += 1


def _cache_root() -> Path:
    return Path(os.environ.get("CLIPMED_CACHE") or "~/.cache/clipmed").expanduser()


def _hf_image(value: Any, rec_id: str, base: str, cache_dir: Path) -> str | None:
    """A local file for an undecoded Image value: its own path when that exists, else cached bytes."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _RowProblem("image value is not an Image feature")
    original = value.get("path")
    if original:
        candidate = os.path.join(base, original)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    data = value.get("bytes")
    if not data:
        return _path_value(original, base)  # a dangling path: validation reports it as missing
    suffix = Path(original).suffix.lower().lstrip(".") if original else ""
    ext = suffix or next((ext for magic, ext in _IMAGE_MAGIC if data.startswith(magic)), "img")
    target = cache_dir / f"{_safe_name(rec_id)}.{ext}"
    if not target.is_file():  # written once per dataset fingerprint, then reused
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return str(target)


def _safe_name(rec_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", rec_id)[:100]
    if safe != rec_id:  # keep distinct ids distinct after the substitution
        safe += "-" + hashlib.sha256(rec_id.encode()).hexdigest()[:10]
    return safe


# --- shared row handling ------------------------------------------------------------------------

def _union_keys(rows: Iterable[Any]) -> set[str]:
    keys: set[str] = set()
    for row in rows:
        if isinstance(row, dict):
            keys.update(row)
    return keys


def _default_or(columns: set[str], name: str, default: str, alternative: str) -> str:
    """`alternative` (a layout's own name for a field) when the default field name is absent."""
    if name not in columns and name == default and alternative in columns:
        return alternative
    return name


def _require(columns: set[str], name: str, role: str, option: str, where: Any) -> str:
    """`name` when the source has that field, else a ClipmedError that says what exists and what to pass.

    A source without any row has no fields to check; it fails later for having nothing usable.
    """
    if name in columns or not columns:
        return name
    present = ", ".join(sorted(columns)) or "none"
    raise ClipmedError(f"{where}: no field '{name}' for the {role} (fields: {present}); "
                       f"pass {option} with the field that holds it")


def _columns(columns: set[str], fields: FieldMap, where: Any, image_col: str, caption_col: str) -> _Columns:
    label = group = None
    if fields.label_field is not None:
        label = _require(columns, fields.label_field, "label", "--label-field", where)
    if fields.group_field is not None:
        group = _require(columns, fields.group_field, "group", "--group-field", where)
    id_col = fields.id_field if fields.id_field in columns else None
    used = frozenset(c for c in (id_col, label, group, image_col, caption_col) if c)
    return _Columns(id_col, label, group, used)


def _build(rows: Iterable[tuple[str, Any]], cols: _Columns,
           image_of: Callable[[dict, str], str | None],
           caption_of: Callable[[dict], str | None]) -> tuple[list[Record], list[str], list[tuple[str, str]]]:
    records: list[Record] = []
    locators: list[str] = []
    problems: list[tuple[str, str]] = []
    for index, (locator, row) in enumerate(rows):
        try:
            if isinstance(row, _RowProblem):
                raise row
            if not isinstance(row, dict):
                raise _RowProblem("row is not an object")
            rec_id = _text(row.get(cols.id), "id") if cols.id else None
            rec_id = rec_id if rec_id else f"row-{index}"
            record = Record(
                id=rec_id,
                image_path=image_of(row, rec_id),
                caption=caption_of(row),
                label=_label_text(row.get(cols.label), "label") if cols.label else None,
                group=_label_text(row.get(cols.group), "group") if cols.group else None,
                extra={k: v for k, v in row.items() if k not in cols.used and _is_scalar(v)},
            )
        except _RowProblem as exc:
            problems.append((locator, str(exc)))
            continue
        records.append(record)
        locators.append(locator)
    return records, locators, problems


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _text(value: Any, what: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.isascii():
            try:  # JSON escapes can smuggle in lone surrogates, which no file can store
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _RowProblem(f"{what} is not valid Unicode") from None
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
    return os.path.abspath(os.path.join(base, value))
