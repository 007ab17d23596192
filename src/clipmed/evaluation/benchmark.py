"""Benchmark suites (`clipmed benchmark`): every model zero-shot on every dataset of a suite, one table.

A suite is a YAML file with a `datasets` list; each entry's keys are the fields of `SuiteDataset` (checked key
by key; relative paths resolve against the suite file's folder). Per model and dataset:

- multiclass: zero-shot top-1 / top-3 / macro-F1 / balanced accuracy with the first template alone and with
  the template ensemble (`classification_metrics`), optionally a linear probe (`probe_train`);
- multilabel: each finding scored by the softmax over its positive and negative prompt; per-finding AUROC,
  macro AUROC and mAP (`multilabel_metrics`), single prompt and ensemble;
- calibration of the ensemble's probabilities (ECE, reliability bins), and with `calibrate` a temperature
  fitted on the dataset's `val` split and the ECE after it.

The headline of a dataset is its ensemble top-1 (multiclass) or ensemble macro AUROC (multilabel): each model's
rank per dataset, and the averages over datasets (equal weight; the interval averages the per-dataset bootstrap
resamples, so each dataset's own uncertainty carries through), one per task kind, never mixed.

Rows whose image is missing or does not decode are skipped and counted, never fatal. Image embeddings are
cached per model and dataset in clipmed's cache folder (`cache_dir("embeddings", ...)`, keyed by the model's
weights and the rows' files), so adding a model to a suite costs only that model.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cache import cache_dir, cache_key
from ..data.datasets import readable_records
from ..data.labels import DEFAULT_MIN_CLASS_COUNT, clean_labels, strip_label
from ..data.records import FieldMap, Record
from ..data.sources import load_source
from ..data.split import IMAGE_ONLY, validate
from ..errors import ClipmedError
from ..io import atomic_write, read_json, write_json_atomic
from ..knowledge import check_template, load_templates
from ..locking import FileLock
from ..models import ClipModel, load_model
from ..models.base import model_fingerprint
from ..options import MAX_SEED, option
from ..schema import build, read_mapping
from .calibration import fit_temperature, reliability
from .embed import embed_images
from .evaluate import EvalConfig, zero_shot_metrics
from .metrics import percentile_interval, bootstrap_resamples
from .multilabel import multilabel_metrics
from .probe import linear_probe
from .zeroshot import class_embeddings

TASKS = ("multiclass", "multilabel")
HEADLINE = {"multiclass": "top1", "multilabel": "macro_auroc"}
AVERAGE_KEYS = {"multiclass": "multiclass_top1", "multilabel": "multilabel_auroc"}


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of a suite: where it is, which field holds the labels, and how to prompt for them."""

    name: str
    data: str
    label_field: str
    task: str = "multiclass"
    format: str | None = None
    image_root: str | None = None
    caption_field: str = "caption"
    image_field: str = "file_name"
    id_field: str = "id"
    classes: list[str] | None = None
    min_class_count: int = DEFAULT_MIN_CLASS_COUNT
    label_sep: str | None = None
    class_prompts: dict[str, str] = field(default_factory=dict)
    templates: list[str] | None = None
    negative_templates: list[str] | None = None
    probe_train: str | None = None
    val: str | None = None


@dataclass(frozen=True)
class _SuiteFile:
    """The keys a suite file may hold."""

    datasets: list[SuiteDataset]


@dataclass(frozen=True)
class Suite:
    datasets: list[SuiteDataset]
    path: str  # the suite file, absolute


@dataclass
class BenchmarkConfig:
    n_boot: int = option(1000, "bootstrap resamples for the intervals", min=1)
    seed: int = option(0, "seed of the bootstrap resamples", min=0, max=MAX_SEED)
    precision: str = option("bf16", "autocast precision of the forward pass", choices=("bf16", "fp32"))
    batch_size: int = option(64, "images per forward pass", min=1)
    calibrate: bool = option(False, "fit a temperature on each dataset's val split and report the ECE before "
                             "and after")
    label_sep: str | None = option(None, "delimiter of multilabel fields held as text (datasets may set label_sep)")
    cache: bool = option(True, "image embeddings are kept in clipmed's cache folder and reused; --no-cache "
                         "embeds every image again")


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and check a suite file; a wrong key, a bad value or a dataset path that does not exist is a
    one-line ClipmedError naming it."""
    path = Path(path)
    values = read_mapping(path, "suite", "a suite is a YAML mapping with a `datasets` list")
    suite = build(_SuiteFile, values, str(path))
    if not suite.datasets:
        raise ClipmedError(f"{path}: `datasets` is empty; list at least one dataset")
    base = path.resolve().parent
    names = Counter(d.name for d in suite.datasets)
    if duplicated := [name for name, count in names.items() if count > 1]:
        raise ClipmedError(f"{path}: dataset name {duplicated[0]!r} is used twice; give every dataset its own name")
    datasets = [_checked(dataset, i, path, base) for i, dataset in enumerate(suite.datasets)]
    return Suite(datasets, str(path.resolve()))


def _checked(d: SuiteDataset, index: int, path: Path, base: Path) -> SuiteDataset:
    """The entry with its paths resolved against the suite's folder and its values checked."""
    where = f"{path}: datasets[{index}] ({d.name})"
    if d.task not in TASKS:
        raise ClipmedError(f"{where}: task {d.task!r} is not one of {', '.join(TASKS)}")
    if d.task == "multiclass":
        for key in ("label_sep", "negative_templates"):
            if getattr(d, key) is not None:
                raise ClipmedError(f"{where}: `{key}` is for multilabel datasets; drop it or set task: multilabel")
    elif d.probe_train is not None:
        raise ClipmedError(f"{where}: `probe_train` (a linear probe) is for multiclass datasets; drop it")
    for key in ("templates", "negative_templates"):
        for template in getattr(d, key) or []:
            check_template(template, where)
    if d.templates is not None and not d.templates:
        raise ClipmedError(f"{where}: `templates` is empty; list at least one or drop the key")

    def resolve(key: str, value: str | None) -> str | None:
        if value is None or value.startswith("hf:"):
            return value
        resolved = (base / Path(value).expanduser()).resolve()
        if not resolved.exists():
            raise ClipmedError(f"{where}: {key} {value!r} not found ({resolved}); paths are relative to the suite "
                               "file's folder")
        return str(resolved)

    return SuiteDataset(**{**d.__dict__, "data": resolve("data", d.data), "image_root": resolve("image_root", d.image_root),
                           "probe_train": resolve("probe_train", d.probe_train), "val": resolve("val", d.val)})


# --- reading the datasets -------------------------------------------------------------------------------

@dataclass
class DatasetData:
    """A suite dataset read for evaluation: its usable labeled rows and their targets."""

    spec: SuiteDataset
    records: list[Record]
    targets: np.ndarray  # [N] class indices (multiclass) or [N, C] 0/1 (multilabel)
    classes: list[str]
    source_fingerprint: str
    rejected: dict[str, int]  # rows left out by validation (missing image file, duplicate id...), by reason
    unlabeled: int  # usable rows without a class label
    val: DatasetData | None = None
    probe_train: DatasetData | None = None

    @property
    def words(self) -> list[str]:
        """What each class puts in the prompt: `class_prompts`, else its name."""
        return [self.spec.class_prompts.get(name, name) for name in self.classes]


def read_suite(suite: Suite, config: BenchmarkConfig = BenchmarkConfig()) -> list[DatasetData]:
    """Every dataset of the suite, with its val and probe-train splits (labeled with the test's classes)."""
    out = []
    for spec in suite.datasets:
        data = read_dataset(spec, spec.data, label_sep=config.label_sep)
        if spec.val:
            data.val = read_dataset(spec, spec.val, classes=data.classes, label_sep=config.label_sep)
        if spec.probe_train:
            data.probe_train = read_dataset(spec, spec.probe_train, classes=data.classes, label_sep=config.label_sep)
        out.append(data)
    return out


def read_dataset(spec: SuiteDataset, source: str, *, classes: Sequence[str] | None = None,
                 label_sep: str | None = None) -> DatasetData:
    """The labeled rows of `source` read with the dataset's fields. Images are only checked to exist here;
    one that does not decode is skipped (and counted) when it is embedded."""
    fields = FieldMap(caption_field=spec.caption_field, label_field=spec.label_field, image_field=spec.image_field,
                      group_field=None, id_field=spec.id_field)
    loaded = load_source(source, fmt=spec.format, fields=fields, image_root=spec.image_root)
    checked = validate(loaded, check_images=False)
    # Captions play no part in zero-shot classification: rows without one still count.
    rows = sorted(checked.usable + checked.image_only)
    rejected = dict(Counter(r["reason"].split(" (")[0] for r in checked.rejected if r["uses"] != IMAGE_ONLY))
    classes = list(classes) if classes is not None else spec.classes
    if spec.task == "multiclass":
        labelset = clean_labels([loaded.records[i].label for i in rows], classes=classes,
                                min_class_count=spec.min_class_count)
        index = {name: c for c, name in enumerate(labelset.classes)}
        keep = [(i, label) for i, label in zip(rows, labelset.labels) if label is not None]
        records = [loaded.records[i] for i, _ in keep]
        targets = np.array([index[label] for _, label in keep], dtype=np.int64)
        class_list = labelset.classes
    else:
        sep = spec.label_sep if spec.label_sep is not None else label_sep
        parsed = [(i, findings_of(loaded.records[i].label, sep, f"{source}: {loaded.locators[i]}")) for i in rows]
        keep = [(i, found) for i, found in parsed if found is not None]
        if classes is None:
            counts = Counter(name for _, found in keep for name in set(found))
            if spec.min_class_count < 1:
                raise ClipmedError(f"{spec.name}: min_class_count must be at least 1, not {spec.min_class_count}")
            classes = sorted(name for name, count in counts.items() if count >= spec.min_class_count)
        class_list = list(classes)
        index = {name: c for c, name in enumerate(class_list)}
        records = [loaded.records[i] for i, _ in keep]
        targets = np.zeros((len(keep), len(class_list)), dtype=np.int64)
        for row, (_, found) in enumerate(keep):
            targets[row, [index[name] for name in found if name in index]] = 1
    if not records or not class_list:
        reasons = "".join(f"; {count} rows: {reason}" for reason, count in Counter(
            r["reason"].split(" (")[0] for r in checked.rejected).most_common(2))
        raise ClipmedError(f"{spec.name}: {source} has no usable labeled row in field {spec.label_field!r} "
                           f"({len(rows)} rows with an image, classes {class_list or 'none'}{reasons}); check "
                           "label_field, classes, min_class_count and image_root")
    return DatasetData(spec, records, targets, class_list, loaded.fingerprint, rejected, len(rows) - len(records))


def findings_of(value: str | None, sep: str | None, where: str) -> list[str] | None:
    """The findings of a multilabel field: a JSON list of strings, else `sep`-delimited text (no `sep`: one
    finding). None (no value) means unlabeled; an empty value or list means no finding."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ClipmedError(f"{where}: label {text[:60]!r} is not a JSON list of strings; write the findings as "
                               "[\"a\", \"b\"] or as text split by label_sep")
    else:
        items = text.split(sep) if sep else [text]
    return [stripped for item in items if (stripped := strip_label(item))]


# --- embeddings, cached -------------------------------------------------------------------------------

def image_embeddings(model: ClipModel, fingerprint: str, data: DatasetData, config: BenchmarkConfig, *,
                     progress: bool = False) -> tuple[list[int], np.ndarray, dict[str, str]]:
    """(indices of the rows whose image decodes, their L2-normalised embeddings [n, D], {id: reason} of the
    others). With `config.cache` the result is kept under `cache_dir("embeddings", model, precision, data)`."""
    records = data.records
    data_key = cache_key(data.source_fingerprint, [(r.id, r.image_path, *_stat(r.image_path)) for r in records])
    if not config.cache:
        return _embed(model, records, config, progress)
    entry = cache_dir("embeddings", fingerprint, config.precision, data_key)
    with FileLock(entry, what="embeddings"):
        if (entry / "entry.json").is_file():
            meta = read_json(entry / "entry.json")
            embeddings = np.load(entry / "embeddings.npy")
            return meta["keep"], embeddings, meta["skipped"]
        keep, embeddings, skipped = _embed(model, records, config, progress)
        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, embeddings)

        atomic_write(entry / "embeddings.npy", write)
        # entry.json last: a folder holding it holds a complete entry.
        write_json_atomic(entry / "entry.json", {"keep": keep, "skipped": skipped, "n_rows": len(records)})
    return keep, embeddings, skipped


def _stat(path: str | None) -> tuple[int, int]:
    try:
        info = os.stat(path) if path else None
    except OSError:
        info = None
    return (info.st_size, info.st_mtime_ns) if info else (-1, -1)


def _embed(model: ClipModel, records: list[Record], config: BenchmarkConfig,
           progress: bool) -> tuple[list[int], np.ndarray, dict[str, str]]:
    keep, skipped = readable_records(records, model.preprocess.size, model.preprocess.interpolation)
    embeddings = embed_images(model, [records[i] for i in keep], batch_size=config.batch_size,
                              precision=config.precision, progress=progress).numpy()
    return keep, embeddings.reshape(len(keep), -1).astype(np.float32), skipped


# --- one model on one dataset -------------------------------------------------------------------------

@dataclass
class Evaluation:
    """One model on every dataset: the evaluate JSON per dataset and the bootstrap resamples of each headline."""

    results: dict[str, dict]
    samples: dict[str, np.ndarray | None]


def evaluate_model(model: ClipModel, datasets: Sequence[DatasetData], config: BenchmarkConfig = BenchmarkConfig(),
                   *, progress: bool = False) -> Evaluation:
    """Score one model on every dataset (see the module docstring)."""
    fingerprint = model_fingerprint(model) if config.cache else ""
    results, samples = {}, {}
    for data in datasets:
        scorer = _multiclass if data.spec.task == "multiclass" else _multilabel
        results[data.spec.name], samples[data.spec.name] = scorer(model, fingerprint, data, config, progress)
    return Evaluation(results, samples)


def _multiclass(model: ClipModel, fingerprint: str, data: DatasetData, config: BenchmarkConfig,
                progress: bool) -> tuple[dict, np.ndarray]:
    keep, images, skipped = image_embeddings(model, fingerprint, data, config, progress=progress)
    labels = data.targets[keep]
    templates = data.spec.templates or load_templates(data.spec.label_field)
    evaluation = EvalConfig(precision=config.precision, n_boot=config.n_boot, seed=config.seed)
    tensor = torch.from_numpy(images)
    result, _ = zero_shot_metrics(model, tensor, labels, data.classes, templates[:1], evaluation, words=data.words)
    result["ensemble"], scores = zero_shot_metrics(model, tensor, labels, data.classes, templates, evaluation,
                                                   words=data.words)
    scale = model.scale().item()
    result["calibration"] = _calibration(scale * scores, labels, _val_logits(model, fingerprint, data, config,
                                                                             templates, scale), config)
    if data.probe_train is not None:
        train_keep, train_images, _ = image_embeddings(model, fingerprint, data.probe_train, config)
        result["probe"] = linear_probe(train_images, data.probe_train.targets[train_keep], images, labels,
                                       data.classes, shots=(), seed=config.seed, n_boot=config.n_boot)
    hits = (scores.argmax(axis=1) == labels).astype(np.float64)
    draws = bootstrap_resamples(len(hits), config.n_boot, config.seed)
    boot = np.concatenate([hits[idx].mean(axis=1) for idx in draws])
    return _with_counts(result, data, skipped), boot


def _multilabel(model: ClipModel, fingerprint: str, data: DatasetData, config: BenchmarkConfig,
                progress: bool) -> tuple[dict, np.ndarray | None]:
    keep, images, skipped = image_embeddings(model, fingerprint, data, config, progress=progress)
    targets = data.targets[keep]
    positive, negative = _finding_templates(data)
    scale = model.scale().item()
    single = multilabel_metrics(_finding_logits(model, images, data.words, positive[:1], negative[:1], scale, config),
                                targets, data.classes, n_boot=config.n_boot, seed=config.seed)
    logits = _finding_logits(model, images, data.words, positive, negative, scale, config)
    ensemble = multilabel_metrics(logits, targets, data.classes, n_boot=config.n_boot, seed=config.seed)
    result = {**single.metrics, "templates": positive[:1], "negative_templates": negative[:1],
              "ensemble": {**ensemble.metrics, "templates": positive, "negative_templates": negative}}
    val_logits = None
    if config.calibrate and data.val is not None:
        val_keep, val_images, _ = image_embeddings(model, fingerprint, data.val, config)
        val_logits = _binary(_finding_logits(model, val_images, data.words, positive, negative, scale, config),
                             data.val.targets[val_keep])
    result["calibration"] = _calibration(*_binary(logits, targets), val_logits, config)
    return _with_counts(result, data, skipped), ensemble.macro_auroc_samples


def _finding_templates(data: DatasetData) -> tuple[list[str], list[str]]:
    positive = data.spec.templates or load_templates("finding_present")
    negative = data.spec.negative_templates or load_templates("finding_absent")
    return list(positive), list(negative)


def _finding_logits(model: ClipModel, images: np.ndarray, words: list[str], positive: list[str],
                    negative: list[str], scale: float, config: BenchmarkConfig) -> np.ndarray:
    """[N, F] log-odds of each finding: scale x (cosine to its positive prompt - cosine to its negative one),
    whose sigmoid is the softmax over the two prompts."""
    pos = class_embeddings(model, words, positive, precision=config.precision).numpy()
    neg = class_embeddings(model, words, negative, precision=config.precision).numpy()
    return scale * (images @ pos.T - images @ neg.T)


def _binary(log_odds: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, finding) as a two-column row of logits [positive, negative] and its true column."""
    flat = log_odds.reshape(-1)
    return np.stack([flat, np.zeros_like(flat)], axis=1), (1 - targets.reshape(-1)).astype(np.int64)


def _val_logits(model: ClipModel, fingerprint: str, data: DatasetData, config: BenchmarkConfig,
                templates: list[str], scale: float) -> tuple[np.ndarray, np.ndarray] | None:
    if not (config.calibrate and data.val is not None):
        return None
    keep, images, _ = image_embeddings(model, fingerprint, data.val, config)
    weights = class_embeddings(model, data.words, templates, precision=config.precision).numpy()
    return scale * (images @ weights.T), data.val.targets[keep]


def _calibration(logits: np.ndarray, labels: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                 config: BenchmarkConfig) -> dict:
    """ECE and reliability bins of the test probabilities; with a val split, the temperature fitted there and
    the test ECE after it. `calibrate` without a val split says so instead."""
    out = reliability(logits, labels)
    if val is not None:
        temperature = fit_temperature(*val)
        after = reliability(logits, labels, temperature=temperature)
        out.update(temperature=temperature, n_val=int(len(val[1])), ece_calibrated=after["ece"],
                   bins_calibrated=after["bins"])
    elif config.calibrate:
        out["temperature"] = None
        out["note"] = "no val split in the suite: not calibrated"
    return out


def _with_counts(result: dict, data: DatasetData, skipped: dict[str, str]) -> dict:
    result["task"] = data.spec.task
    result["rejected_rows"] = data.rejected
    result["unlabeled_rows"] = data.unlabeled
    if skipped:
        result["unreadable_images"] = skipped
    return result


# --- many models: averages, ranks, the benchmark JSON ---------------------------------------------------

def headline(result: dict) -> tuple[float | None, list[float] | None]:
    """A dataset's headline value and interval: ensemble top-1 (multiclass) or macro AUROC (multilabel)."""
    key = HEADLINE[result["task"]]
    return result["ensemble"][key], result["ensemble"]["ci95"][key]


def summarize(evaluations: dict[str, Evaluation], datasets: Sequence[DatasetData]) -> dict:
    """`{"average": {model: {"multiclass_top1": {"value", "ci95", "datasets"} | None, "multilabel_auroc": ...}},
    "rank": {dataset: {model: rank}}}`: the equal-weight mean of the headline over the datasets of each task kind
    (datasets where it is undefined left out), its interval from the mean of the per-dataset resamples, and
    rank 1 for the best headline of each dataset (equal values share the better rank)."""
    average: dict[str, dict] = {}
    for model, evaluation in evaluations.items():
        average[model] = {}
        for task, key in AVERAGE_KEYS.items():
            names = [d.spec.name for d in datasets
                     if d.spec.task == task and evaluation.samples[d.spec.name] is not None]
            if not names:
                average[model][key] = None
                continue
            values = [headline(evaluation.results[name])[0] for name in names]
            stacked = np.stack([evaluation.samples[name] for name in names])
            average[model][key] = {"value": float(np.mean(values)), "ci95": percentile_interval(stacked.mean(axis=0)),
                                   "datasets": names}
    rank: dict[str, dict] = {}
    for data in datasets:
        values = {model: headline(e.results[data.spec.name])[0] for model, e in evaluations.items()}
        scored = [v for v in values.values() if v is not None]
        rank[data.spec.name] = {model: (1 + sum(other > value for other in scored)) if value is not None else None
                                for model, value in values.items()}
    return {"average": average, "rank": rank}


def model_names(specs: Sequence[str]) -> dict[str, str]:
    """{column name: spec} from `[NAME=]PATH_OR_SPEC` items; without NAME, a folder's name or the spec itself."""
    named: dict[str, str] = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or not name or any(ch in name for ch in "/:"):
            name, spec = (Path(item).resolve().name if Path(item).exists() else item), item
        if name in named:
            raise ClipmedError(f"two models are named {name!r}: name them as NAME=PATH_OR_SPEC")
        named[name] = spec
    return named


def run_benchmark(models: dict[str, str], suite: Suite, config: BenchmarkConfig = BenchmarkConfig(), *,
                  device: str = "cpu", trust_remote_code: bool = False, progress: bool = False) -> dict:
    """The benchmark JSON: `{"suite", "config", "models", "model_specs", "datasets", "dataset_info",
    "results": {model: {dataset: evaluate JSON}}, "average", "rank"}`."""
    datasets = read_suite(suite, config)
    evaluations = {}
    for name, spec in models.items():
        print(f"benchmark: {name}", file=sys.stderr, flush=True)
        # A spec with fresh parts (the dual default's projections) is initialised from the global RNG.
        torch.manual_seed(config.seed)
        model = load_model(spec, trust_remote_code=trust_remote_code).to(device)
        evaluations[name] = evaluate_model(model, datasets, config, progress=progress)
    info = {d.spec.name: {"task": d.spec.task, "data": d.spec.data, "label_field": d.spec.label_field,
                          "classes": d.classes, "n_rows": len(d.records), "rejected_rows": d.rejected,
                          "unlabeled_rows": d.unlabeled, "val_rows": len(d.val.records) if d.val else None,
                          "probe_train_rows": len(d.probe_train.records) if d.probe_train else None}
            for d in datasets}
    return {"suite": suite.path, "config": config.__dict__, "models": list(models), "model_specs": dict(models),
            "datasets": [d.spec.name for d in datasets], "dataset_info": info,
            "results": {name: e.results for name, e in evaluations.items()}, **summarize(evaluations, datasets)}
