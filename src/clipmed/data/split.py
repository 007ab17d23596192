"""`prepare`: validate a dataset and split it the paper's way into train / val / test / caption pool.

The algorithm (deterministic for a given source, options and seed; worker counts change nothing):

0. Validate every row, streaming the source (memory holds ids, labels and groups per row, never captions or
   pixels). A row is rejected for being unreadable (not JSON, not UTF-8, ...), a duplicate id (the first one
   is kept), an empty or missing caption, or an image that is missing, empty, not an image, truncated/corrupt,
   too large or outside the dataset folder. A row whose only fault is its image keeps its caption as a
   *text-only* row; one whose only fault is its caption keeps its image as an *image-only* row (both serve
   decoupled batches). Images are decoded in worker processes, in chunks whose results are checkpointed
   under the output folder, so a killed prepare resumes without decoding them again. Rows whose label is not
   a class are not rejected: they are *unlabeled* (caption objectives only), and rejected.jsonl says why.
1. Sample `n` labeled rows (all of them when there are fewer), stratified by class; every class keeps at
   least 3 rows so that it can appear in train, val and test.
2. Val and test take 10% of the sample each, stratified: per class, the exact share rounded by largest
   remainder (so within one row of it), at least one row. With a group field (e.g. the article a figure
   comes from) whole groups are assigned, and a group of val/test appears in no other split: its other
   rows are held out of train and of the pool.
3. Train: the rest of the sample, at most ``(sample - val - test) // n_classes`` rows per class (an equal
   share of the train budget); a smaller class gives all it has and the budget it leaves is not
   redistributed, so label objectives see balanced classes.
4. The caption pool: every usable row that is not in val/test nor in one of their groups: train, the
   labeled rows the cap or the sample left out, and the unlabeled rows. Caption objectives train on the
   pool, label objectives on train only. Text-only and image-only rows are listed apart (``text_only``,
   ``image_only``), also without the val/test groups.

A class with fewer than 3 usable rows, or whose groups cannot be spread over train, val and test, is a
ClipmedError that suggests --min-class-count or --classes: a class missing from val or test would make its
scores silently meaningless.

Outputs, written atomically while the output folder is locked: ``ids.parquet`` (the ids of every split,
sorted: small and fast at a million rows), ``rejected.jsonl`` (one row per rejected row, then one per row
dropped from label use: id, locator, reason, uses) and, last, ``split.json`` (everything else: source, fields,
policies, classes, counts, and the ids file's SHA-256 with ``complete: true``). A killed prepare leaves no
split.json: the old one is removed before the new ids are written. The same inputs give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from clipmed.cache import cache_key
from clipmed.data.images import ImageChecks, default_workers
from clipmed.data.labels import DEFAULT_MIN_CLASS_COUNT, LabelSet, clean_labels, normalise_label, strip_label
from clipmed.data.records import FieldMap, Record, RecordTable
from clipmed.data.sources import LoadedSource, load_source
from clipmed.errors import ClipmedError
from clipmed.io import atomic_write, read_json, write_json_atomic
from clipmed.locking import FileLock

FORMAT_VERSION = 2  # 1: ids inline in split.json, labels only stripped, every image path accepted
SPLITS = ("train", "val", "test", "pool")
ID_LISTS = (*SPLITS, "text_only", "image_only")  # the lists ids.parquet holds
IDS_FILE = "ids.parquet"
CHECKPOINTS = ".prepare-checks"  # image-check chunks of an unfinished prepare, under the output folder
CHECK_CHUNK = 256  # images per worker task and per checkpoint file
HELD_OUT_FRACTION = Fraction(1, 10)  # of the sample, for val and for test each
MIN_ROWS_PER_CLASS = 3  # one each for train, val and test
TEXT_ONLY = "text-only"
IMAGE_ONLY = "image-only"
UNLABELED = "unlabeled"
_KEPT = {TEXT_ONLY: " (kept as a text-only row)", IMAGE_ONLY: " (kept as an image-only row)",
         UNLABELED: " (kept as an unlabeled row)"}  # said in rejected.jsonl, never in a --strict refusal
_DEFAULT_FIELDS = FieldMap()


# --- validation ---------------------------------------------------------------------------------

@dataclass
class Validation:
    """What validation keeps of each readable row (its index here is its index in `LoadedSource.records`): id,
    locator, raw label and group; which rows are usable, text-only or image-only; the rejections."""

    ids: list[str]
    locators: list[str]
    labels: list[str | None]
    groups: list[str | None]
    usable: list[int]
    text_only: list[int]
    image_only: list[int]
    rejected: list[dict]  # {id, locator, reason, uses}, in source order
    rejected_counts: dict[str, int]  # by kind of reason
    rows: int  # every row of the source, readable or not


def validate(loaded: LoadedSource, *, strict: bool = False, check_images: bool = True,
             workers: int | None = None, checkpoints: Path | None = None, progress: bool = False) -> Validation:
    """Sort every row of `loaded` into usable, text-only, image-only or rejected (see the module docstring).

    With `check_images` False images are only checked to exist and be non-empty (no decoding). `workers`
    processes decode images (default: one per core); `checkpoints` is the folder of resumable results.
    `strict` turns the first rejection (in source order) into a ClipmedError.
    """
    from tqdm import tqdm  # the progress bar of the one slow step

    rejected: list[tuple[int, dict]] = []  # (source position, entry)
    counts: Counter[str] = Counter()

    def reject(position: int, rec_id: str | None, locator: str, kind: str, reason: str, uses: str) -> None:
        rejected.append((position, {"id": rec_id, "locator": locator, "reason": reason, "uses": uses}))
        counts[kind] += 1

    ids: list[str] = []
    labels: list[str | None] = []
    groups: list[str | None] = []
    where: list[tuple[int, str]] = []  # (source position, locator) per readable row
    caption_faults: dict[int, str] = {}
    image_faults: dict[int, str] = {}
    first_seen: dict[str, str] = {}
    duplicates: set[int] = set()
    position = -1

    def checked(indices: list[int], faults: list[str | None]) -> None:
        image_faults.update((index, fault) for index, fault in zip(indices, faults) if fault is not None)

    rows = tqdm(loaded.rows(), desc="validating", unit=" rows", disable=not progress, mininterval=1.0)
    with ImageChecks(decode=check_images, workers=workers or default_workers(), checkpoints=checkpoints,
                     chunk=CHECK_CHUNK) as checks:
        for position, row in enumerate(rows):
            record = row.record
            if record is None:
                reject(position, None, row.locator, "unparseable row", f"unparseable row: {row.problem}", "none")
                continue
            index = len(ids)
            ids.append(record.id)
            labels.append(record.label)
            groups.append(record.group)
            where.append((position, row.locator))
            if record.id in first_seen:
                reject(position, record.id, row.locator, "duplicate id",
                       f"duplicate id (first seen at {first_seen[record.id]})", "none")
                duplicates.add(index)
                continue
            first_seen[record.id] = row.locator
            if record.caption is None or not record.caption.strip():
                caption_faults[index] = "missing caption" if record.caption is None else "empty caption"
            if record.image_path is None:
                image_faults[index] = record.image_fault or "no image path"
            else:
                for done in checks.add(index, record.image_path):
                    checked(*done)
        for done in checks.finish():
            checked(*done)

    usable: list[int] = []
    text_only: list[int] = []
    image_only: list[int] = []
    for index, (at, locator) in enumerate(where):
        if index in duplicates:
            continue
        caption_fault, image_fault = caption_faults.get(index), image_faults.get(index)
        if caption_fault and image_fault:
            reject(at, ids[index], locator, "unusable caption and image", f"{caption_fault}; {image_fault}", "none")
        elif caption_fault:
            reject(at, ids[index], locator, caption_fault, caption_fault, IMAGE_ONLY)
            image_only.append(index)
        elif image_fault:
            reject(at, ids[index], locator, image_fault.split(":")[0], image_fault, TEXT_ONLY)
            text_only.append(index)
        else:
            usable.append(index)
    rejected.sort(key=lambda item: item[0])
    if strict and rejected:
        entry = rejected[0][1]
        raise ClipmedError(f"{entry['locator']}: {entry['reason']} (--strict refuses every unusable row; without "
                           f"it such rows are listed in rejected.jsonl and skipped)")
    entries = [dict(entry, reason=entry["reason"] + _KEPT.get(entry["uses"], "")) for _, entry in rejected]
    return Validation(ids, [locator for _, locator in where], labels, groups, usable, text_only, image_only, entries,
                      dict(counts), position + 1)


# --- the split itself (pure) --------------------------------------------------------------------

class SplitRow(NamedTuple):
    """What the split needs of a usable row: its id, clean label (None: unlabeled) and group."""

    id: str
    label: str | None
    group: str | None


@dataclass
class SplitPlan:
    """Sorted ids per split; `held_out` are rows dropped because their group went to val/test."""

    train: list[str]
    val: list[str]
    test: list[str]
    pool: list[str]
    held_out: list[str]
    held_out_groups: set[str]
    sampled: dict[str, int]  # rows per class in the stratified sample
    train_cap: int

    @property
    def sample_size(self) -> int:
        return sum(self.sampled.values())


def assign_splits(rows: Sequence[SplitRow], classes: Sequence[str], *, n: int, seed: int) -> SplitPlan:
    """Steps 1-4 of the module docstring on rows that already passed validation (unique ids)."""
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for row in rows:
        if row.label is not None:
            by_class[row.label].append(row.id)
    for name, ids in by_class.items():
        if len(ids) < MIN_ROWS_PER_CLASS:
            raise ClipmedError(
                f"class {name!r} has {len(ids)} usable labeled rows; each class needs at least "
                f"{MIN_ROWS_PER_CLASS} (one each for train, val and test): raise --min-class-count "
                f"or leave it out of --classes")

    # 1. Stratified sample.
    quotas = _sample_quotas({name: len(ids) for name, ids in by_class.items()}, n)
    sample = {name: sorted(rng.sample(sorted(ids), quotas[name])) for name, ids in by_class.items()}

    # 2. Val and test, whole groups at a time.
    group_of = {row.id: row.group for row in rows}
    label_of = {row.id: row.label for row in rows}
    units = _units((rid for ids in sample.values() for rid in ids), group_of, label_of)
    rng.shuffle(units)
    sizes = {name: len(ids) for name, ids in sample.items()}
    targets = _held_out_targets(sizes)
    exact = {name: float(size * HELD_OUT_FRACTION) for name, size in sizes.items()}
    taken: set[int] = set()
    test = _fill(units, taken, targets, exact)
    val = _fill(units, taken, targets, exact)
    for split_name, ids in (("val", val), ("test", test)):
        have = Counter(label_of[rid] for rid in ids)
        for name in classes:
            if have[name] == 0:
                raise ClipmedError(
                    f"class {name!r}: none of its rows could go to {split_name} without putting one group "
                    f"in two splits (its {sizes[name]} sampled rows come from too few groups); raise "
                    f"--min-class-count, leave it out of --classes, or choose another --group-field")
    held_out_groups = {group_of[rid] for rid in val + test if group_of[rid] is not None}
    held = set(val) | set(test)

    # 3. Train: the rest of the sample, capped per class.
    budget = sum(quotas.values()) - len(val) - len(test)
    cap = budget // len(classes)
    train: list[str] = []
    for name in classes:
        rest = [rid for rid in sample[name] if rid not in held]
        if not rest:
            raise ClipmedError(
                f"class {name!r}: no row left for train after val and test took whole groups; raise "
                f"--min-class-count, leave it out of --classes, or choose another --group-field")
        rng.shuffle(rest)
        train.extend(rest[:cap])

    # 4. Pool: everything usable outside val/test and their groups.
    pool, held_out = [], []
    for row in rows:
        if row.id in held:
            continue
        if row.group is not None and row.group in held_out_groups:
            held_out.append(row.id)
        else:
            pool.append(row.id)
    return SplitPlan(sorted(train), sorted(val), sorted(test), sorted(pool), sorted(held_out),
                     held_out_groups, quotas, cap)


def _largest_remainder(exact: dict[str, Fraction], total: int) -> dict[str, int]:
    """Integers summing to `total`, each the floor or ceiling of its exact share (ties: input order)."""
    counts = {name: int(share) for name, share in exact.items()}  # floor: shares are non-negative
    order = sorted(exact, key=lambda name: -(exact[name] - counts[name]))  # stable: ties keep order
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _sample_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    if n < MIN_ROWS_PER_CLASS * len(sizes):
        raise ClipmedError(f"--n {n} is too small for {len(sizes)} classes: each class needs at least "
                           f"{MIN_ROWS_PER_CLASS} sampled rows; use --n {MIN_ROWS_PER_CLASS * len(sizes)} "
                           f"or more")
    quotas = _largest_remainder({name: Fraction(size * n, total) for name, size in sizes.items()}, n)
    for name in quotas:
        quotas[name] = max(quotas[name], MIN_ROWS_PER_CLASS)
    # Raising small classes to the minimum overshoots n; take the excess back from the largest quotas.
    while sum(quotas.values()) > n:
        largest = max(quotas, key=lambda name: quotas[name])
        quotas[largest] -= 1
    return quotas


def _held_out_targets(sizes: dict[str, int]) -> dict[str, int]:
    total = round(sum(sizes.values()) * HELD_OUT_FRACTION)
    counts = _largest_remainder({name: size * HELD_OUT_FRACTION for name, size in sizes.items()}, total)
    return {name: max(1, count) for name, count in counts.items()}


@dataclass
class _Unit:
    """Rows that must stay together: the sampled rows of one group, or one ungrouped row."""

    ids: list[str]
    counts: Counter[str]


def _units(ids: Iterable[str], group_of: dict[str, str | None], label_of: dict[str, str | None]) -> list[_Unit]:
    grouped: dict[str, list[str]] = {}
    units: list[_Unit] = []
    for rid in ids:
        group = group_of[rid]
        if group is None:
            units.append(_Unit([rid], Counter([label_of[rid]])))
        else:
            grouped.setdefault(group, []).append(rid)
    for group in sorted(grouped):
        members = sorted(grouped[group])
        units.append(_Unit(members, Counter(label_of[rid] for rid in members)))
    units.sort(key=lambda unit: unit.ids[0])  # a fixed order before the seeded shuffle
    return units


def _fill(units: list[_Unit], taken: set[int], targets: dict[str, int],
          exact: dict[str, float]) -> list[str]:
    """Take whole units until each class meets its target.

    First pass: units that overshoot no class (exact when enough small groups exist). Second pass, for
    targets large groups left unmet: units that bring the class counts closer to their exact shares.
    """
    have: Counter[str] = Counter()
    chosen: list[str] = []

    def take(position: int, unit: _Unit) -> None:
        taken.add(position)
        have.update(unit.counts)
        chosen.extend(unit.ids)

    for position, unit in enumerate(units):
        if position in taken:
            continue
        if any(have[c] < targets[c] for c in unit.counts) and \
                all(have[c] + k <= targets[c] for c, k in unit.counts.items()):
            take(position, unit)
    if any(have[c] < targets[c] for c in targets):
        for position, unit in enumerate(units):
            if position in taken:
                continue
            gain = sum(abs(have[c] + k - exact[c]) - abs(have[c] - exact[c]) for c, k in unit.counts.items())
            if gain < 0:
                take(position, unit)
    return chosen


# --- prepare ------------------------------------------------------------------------------------

# Labeled rows `prepare` samples by default: the paper's 4,096 PubMedVision rows.
DEFAULT_N = 4096


def prepare(source_path: str, out_dir: str | os.PathLike, *, fmt: str | None = None,
            fields: FieldMap = _DEFAULT_FIELDS, image_root: str | None = None,
            classes: Sequence[str] | None = None, min_class_count: int = DEFAULT_MIN_CLASS_COUNT,
            n: int = DEFAULT_N, seed: int = 0, strict: bool = False, check_images: bool = True,
            streaming: bool = False, allow_outside_paths: bool = False, case_sensitive_labels: bool = False,
            workers: int | None = None, progress: bool = True) -> dict:
    """Validate and split a dataset; write ``ids.parquet``, ``rejected.jsonl`` and ``split.json`` in `out_dir`.

    Returns a summary: output paths, classes, split sizes, counts (as in split.json), warnings, seconds.
    """
    started = time.perf_counter()
    if n < 1:
        raise ClipmedError(f"--n must be at least 1, not {n}")
    out = Path(out_dir)
    with FileLock(out, what="prepare"):
        loaded = load_source(source_path, fmt=fmt, fields=fields, image_root=image_root, streaming=streaming,
                             allow_outside_paths=allow_outside_paths)
        checkpoints = out / CHECKPOINTS / cache_key(loaded.path, loaded.fingerprint, allow_outside_paths)
        checked = validate(loaded, strict=strict, check_images=check_images, workers=workers,
                           checkpoints=checkpoints, progress=progress)
        labelset = _classes_of(loaded, checked, fields, classes, min_class_count, case_sensitive_labels)
        class_list = labelset.classes
        rows = [SplitRow(checked.ids[i], label, strip_label(checked.groups[i]))
                for i, label in zip(checked.usable, labelset.labels)]
        plan = assign_splits(rows, class_list, n=n, seed=seed)

        text_only, image_only = (sorted(checked.ids[i] for i in indices
                                        if strip_label(checked.groups[i]) not in plan.held_out_groups)
                                 for indices in (checked.text_only, checked.image_only))
        label_of = {row.id: row.label for row in rows}
        pool_labeled = sum(label_of[rid] is not None for rid in plan.pool)
        splits = {"train": plan.train, "val": plan.val, "test": plan.test, "pool": plan.pool}
        counts = {
            **{name: _per_class(splits[name], label_of, class_list) for name in ("train", "val", "test")},
            "pool": {"labeled": pool_labeled, "unlabeled": len(plan.pool) - pool_labeled},
            "rejected": dict(sorted(checked.rejected_counts.items())),
            "rejected_total": len(checked.rejected),
            "label_dropped": len(labelset.dropped),
            "rows": checked.rows,
            "usable": len(rows),
            "labeled": len(rows) - labelset.unlabeled,
            "unlabeled": labelset.unlabeled,
            "sample": dict(plan.sampled),
            "train_cap": plan.train_cap,
            "held_out_by_group": len(plan.held_out),
            "text_only": len(text_only),
            "image_only": len(image_only),
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": {"path": loaded.path, "format": loaded.format, "image_root": loaded.image_root,
                       "fingerprint": loaded.fingerprint, "streaming": loaded.streaming},
            "allow_outside_paths": loaded.allow_outside_paths,
            "labels": {"case_sensitive": case_sensitive_labels, "merged": labelset.merged},
            "fields": dataclasses.asdict(fields),
            "seed": seed,
            "n": n,
            "classes": class_list,
            "min_class_count": min_class_count,
            "check_images": check_images,
            "counts": counts,
        }
        dropped = [{"id": checked.ids[index], "locator": checked.locators[index], "reason": reason + _KEPT[UNLABELED],
                    "uses": UNLABELED} for index, reason in ((checked.usable[position], reason)
                                                            for position, reason in sorted(labelset.dropped.items()))]
        _write_prepared(out, manifest, {**splits, "text_only": text_only, "image_only": image_only},
                        checked.rejected + dropped)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)

    warnings = [f"class {name!r} has {count} train rows, under the per-class cap of {plan.train_cap}"
                for name, count in counts["train"].items() if count < plan.train_cap]
    merges: dict[str, list[str]] = {}
    for spelling, name in labelset.merged.items():
        merges.setdefault(name, []).append(spelling)
    warnings += [f"merged label spellings {', '.join(map(repr, spellings))} into {name!r} "
                 f"(--case-sensitive-labels keeps them apart)" for name, spellings in merges.items()]
    return {
        "split_json": str(out / "split.json"),
        "rejected_jsonl": str(out / "rejected.jsonl"),
        "classes": class_list,
        "sizes": {name: len(ids) for name, ids in splits.items()} | {"text_only": len(text_only),
                                                                     "image_only": len(image_only)},
        "counts": counts,
        "label_merges": merges,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_prepared(out: Path, manifest: dict, lists: dict[str, list[str]], rejected: list[dict]) -> None:
    """ids.parquet, rejected.jsonl, then split.json marked complete; the old split.json goes first, so no kill
    leaves a manifest beside ids it does not describe."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "split.json").unlink(missing_ok=True)
    table = pa.table({"list": pa.array([name for name in ID_LISTS for _ in lists[name]]).dictionary_encode(),
                      "id": pa.array([rid for name in ID_LISTS for rid in lists[name]], pa.string())})
    atomic_write(out / IDS_FILE, lambda tmp: pq.write_table(table, tmp, compression="zstd"))

    def write_rejected(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for entry in rejected:
                handle.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")

    atomic_write(out / "rejected.jsonl", write_rejected)
    write_json_atomic(out / "split.json", {**manifest, "ids": {"file": IDS_FILE, "sha256": _sha256(out / IDS_FILE)},
                                           "complete": True})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _per_class(ids: list[str], label_of: dict[str, str | None], classes: list[str]) -> dict[str, int]:
    have = Counter(label_of[rid] for rid in ids)
    return {name: have[name] for name in classes}


def _classes_of(loaded: LoadedSource, checked: Validation, fields: FieldMap, classes: Sequence[str] | None,
                min_class_count: int, case_sensitive: bool) -> LabelSet:
    """Classes and clean labels of the usable rows, or a ClipmedError saying why nothing is usable."""
    if not checked.usable:
        reasons = ", ".join(f"{kind} {count}" for kind, count in
                            Counter(checked.rejected_counts).most_common(3)) or "no rows"
        raise ClipmedError(
            f"{loaded.path}: no usable row (image and caption both fine) among {checked.rows} ({reasons}); "
            f"check --image-root, --image-field '{fields.image_field}' and --caption-field "
            f"'{fields.caption_field}'")
    labelset = clean_labels([checked.labels[i] for i in checked.usable], classes=classes,
                            min_class_count=min_class_count, case_sensitive=case_sensitive)
    if not any(label is not None for label in labelset.labels):
        values = Counter(normalise_label(checked.labels[i]) for i in checked.usable)
        values.pop(None, None)
        common = ", ".join(f"{value!r} {count}" for value, count in values.most_common(5)) or "none"
        wanted = (f"--classes {', '.join(labelset.classes)}" if classes is not None
                  else f"--min-class-count {min_class_count}")
        raise ClipmedError(
            f"{loaded.path}: none of the {len(checked.usable)} usable rows has a class label with "
            f"{wanted} (label field '{fields.label_field}'; most common values: {common}); pass "
            f"--label-field, --classes or a lower --min-class-count")
    return labelset


# --- reading a prepared split back --------------------------------------------------------------

@dataclass
class PreparedData:
    """A prepared split with its source re-loaded: records per split carry the clean label (or None).

    `manifest` is split.json with the id lists (``splits``, ``text_only``, ``image_only``) filled in; `table`
    holds every listed row once, column-wise, and `positions` each list's rows in it (manifest order).
    """

    directory: Path
    manifest: dict
    classes: list[str]
    source: LoadedSource
    table: RecordTable
    positions: dict[str, np.ndarray]

    def records(self, split: str) -> RecordTable:
        """The records of `split` (train, val, test or pool), in the manifest's (sorted) order."""
        if split not in SPLITS:
            raise ClipmedError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        return self.table.take(self.positions[split])

    def text_only_records(self) -> RecordTable:
        """Rows whose image is unusable but whose caption is fine (text-only objectives)."""
        return self.table.take(self.positions["text_only"])

    def image_only_records(self) -> RecordTable:
        """Rows whose caption is unusable but whose image is fine (image-only rows of decoupled batches)."""
        return self.table.take(self.positions["image_only"])

    def record(self, rid: str) -> Record:
        """The listed row with id `rid` (a KeyError for an id no list of the split holds)."""
        (position,) = self.table.positions_of([rid])
        if position < 0:
            raise KeyError(rid)
        return self.table[int(position)]

    def label_index(self, record: Record) -> int:
        """The class index of a labeled record (ValueError for an unlabeled one)."""
        if record.label is None or record.label not in self.classes:
            raise ValueError(f"record {record.id} has no class label")
        return self.classes.index(record.label)


def read_manifest(directory: str | os.PathLike) -> dict:
    """split.json of a finished prepare, with its id lists; a ClipmedError for a missing or unfinished one."""
    directory = Path(directory)
    path = directory / "split.json"
    if not path.is_file():
        raise ClipmedError(f"{directory}: no split.json; run `clipmed prepare` with --out {directory} first")
    manifest = read_json(path)
    version = manifest.get("format_version")
    if version == 1:
        return manifest
    if version != FORMAT_VERSION:
        raise ClipmedError(f"{path}: split format version {version}, this clipmed reads versions 1 and "
                           f"{FORMAT_VERSION}; re-run `clipmed prepare`")
    ids = directory / manifest.get("ids", {}).get("file", IDS_FILE)
    if manifest.get("complete") is not True or not ids.is_file() or _sha256(ids) != manifest["ids"]["sha256"]:
        raise ClipmedError(f"{path} belongs to an unfinished or interrupted prepare (its {ids.name} is missing or "
                           f"does not match); run `clipmed prepare` again with --out {directory}")
    import pyarrow.parquet as pq

    table = pq.read_table(ids)
    every = table.column("id").to_pylist()
    names = table.column("list").combine_chunks()  # dictionary-encoded: compare codes, not a million strings
    codes = names.indices.to_numpy(zero_copy_only=False)
    lists: dict[str, list[str]] = {name: [] for name in ID_LISTS}
    for code, name in enumerate(names.dictionary.to_pylist()):
        lists[name] = [every[i] for i in np.flatnonzero(codes == code)]
    manifest["splits"] = {name: lists[name] for name in SPLITS}
    manifest["text_only"], manifest["image_only"] = lists["text_only"], lists["image_only"]
    return manifest


def _label_cleaner(manifest: dict) -> Callable[[str | None], str | None]:
    """Raw label -> class (or None), as the manifest's prepare did it."""
    known = set(manifest["classes"])
    if "labels" not in manifest:  # format 1: stripped, exact
        return lambda raw: label if (label := strip_label(raw)) in known else None
    merged = manifest["labels"]["merged"]

    def clean(raw: str | None) -> str | None:
        value = normalise_label(raw)
        label = merged.get(value, value) if value is not None else None
        return label if label in known else None

    return clean


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    """Read a prepared folder and re-load its source, which must not have changed since."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    source = manifest["source"]
    # Manifests written before the path policy existed accepted every path: they keep meaning that.
    loaded = load_source(source["path"], fmt=source["format"], fields=FieldMap(**manifest["fields"]),
                         image_root=source["image_root"], streaming=source.get("streaming", False),
                         allow_outside_paths=manifest.get("allow_outside_paths", True))
    if loaded.fingerprint != source["fingerprint"]:
        raise ClipmedError(f"{source['path']} changed since `clipmed prepare` wrote {directory / 'split.json'}; "
                           f"re-run prepare to split the current data")
    clean = _label_cleaner(manifest)
    wanted = {rid for ids in manifest["splits"].values() for rid in ids}
    wanted.update(manifest["text_only"], manifest["image_only"])

    def listed() -> Iterator[Record]:
        """The first row of each listed id (duplicates: the first counts), its label cleaned."""
        for row in loaded.rows():
            record = row.record
            if record is not None and record.id in wanted:
                wanted.discard(record.id)
                yield dataclasses.replace(record, label=clean(record.label), group=strip_label(record.group))

    table = RecordTable.from_records(listed())
    if wanted:
        raise ClipmedError(f"{directory / 'split.json'}: {len(wanted)} ids (e.g. {sorted(wanted)[0]}) are not in "
                           f"{source['path']}; re-run `clipmed prepare`")
    lists = {**manifest["splits"], "text_only": manifest["text_only"], "image_only": manifest["image_only"]}
    positions = {name: table.positions_of(ids) for name, ids in lists.items()}
    return PreparedData(directory, manifest, list(manifest["classes"]), loaded, table, positions)


def load_for_evaluation(source: str, *, fmt: str | None = None, fields: FieldMap = _DEFAULT_FIELDS,
                        image_root: str | None = None, classes: Sequence[str] | None = None,
                        min_class_count: int = DEFAULT_MIN_CLASS_COUNT, check_images: bool = True,
                        streaming: bool = False, allow_outside_paths: bool = False,
                        case_sensitive_labels: bool = False, workers: int | None = None,
                        progress: bool = False) -> tuple[list[Record], list[str]]:
    """Every usable labeled row of a dataset that was never prepared, with the classes (source order).

    Rows are validated and labels cleaned exactly as in `prepare`; unlabeled and rejected rows are left out.
    """
    loaded = load_source(source, fmt=fmt, fields=fields, image_root=image_root, streaming=streaming,
                         allow_outside_paths=allow_outside_paths)
    checked = validate(loaded, check_images=check_images, workers=workers, progress=progress)
    labelset = _classes_of(loaded, checked, fields, classes, min_class_count, case_sensitive_labels)
    label_of = {checked.ids[i]: label for i, label in zip(checked.usable, labelset.labels) if label is not None}
    records: list[Record] = []
    for row in loaded.rows():
        record = row.record
        if record is not None and record.id in label_of:
            records.append(dataclasses.replace(record, label=label_of.pop(record.id), group=strip_label(record.group)))
    return records, labelset.classes
