"""`clipmed reproduce` and `clipmed sweep`: the papers' experiments on any dataset of their shape.

reproduce: prepare -> evaluate the base model -> fine-tune on captions, on labels and with MedCLIP's semantic
matching -> evaluate every model on test (zero-shot, prompt ensemble, linear probe, retrieval) -> report with
Table 1, per-class and embedding figures. Each step skips work whose complete output already exists, so an
interrupted reproduce continues where it stopped (a half-trained run resumes from its checkpoint).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .data.labels import DEFAULT_MIN_CLASS_COUNT
from .data.records import FieldMap
from .data.sources import FORMATS
from .data.split import DEFAULT_N, PreparedData, load_prepared, prepare
from .errors import ClipmedError
from .evaluation.benchmark import BenchmarkConfig, load_suite, run_benchmark
from .evaluation.evaluate import EvalConfig, Embeddings, full_evaluation, labeled_split, zero_shot_evaluation
from .io import read_json, write_json_atomic
from .knowledge import load_templates
from .locking import FileLock
from .models import DEFAULT_SPEC, load_model
from .objectives import OBJECTIVES, REPRODUCE_OBJECTIVES, get_objective
from .options import MAX_SEED, option
from .report.figures import data_efficiency_figure, embedding_figure, per_class_figure
from .report.benchmark import write_benchmark_report
from .report.gallery import build_gallery
from .report.html import write_html_report
from .report.markdown import write_report
from .training.config import TrainConfig
from .training.train import train
from .training.wise_ft import WiseFTConfig, wise_ft

# The options that say how a dataset is read, on every command that reads one.
SOURCE_OPTIONS = ("fmt", "image_root", "classes", "min_class_count", "case_sensitive_labels", "streaming",
                  "allow_outside_paths")
# Adaptation methods reproduce can add to Table 1 (--methods): run name -> the objective and what the run sets
# beside the shared training options (a LoRA rank or LP epochs typed on the command line win). label-wise-ft is
# WiSE-FT between the caption run and a label run started from it (runs/label-from-caption).
METHODS: dict[str, dict] = {
    "siglip": {"objective": "siglip"},
    "caption-lora": {"objective": "caption", "lora_rank": 8},
    "label-lora": {"objective": "label", "lora_rank": 8},
    "label-lp-ft": {"objective": "label", "lp_epochs": 1},
    "label-wise-ft": {"objective": "label"},
}
WISE_FT_START = "label-from-caption"


@dataclass
class ReproduceConfig:
    data: str = option(help="the dataset (required unless the recipe names it)")
    out: str = option(help="output folder (required unless the recipe names it)")
    model: str = option(DEFAULT_SPEC, "the base model: dual:..., hf:..., openclip:..., or a run folder")
    fmt: str | None = option(None, "source format (default: detected from the path)", choices=FORMATS,
                             flag="--format")
    fields: FieldMap = field(default_factory=FieldMap)
    image_root: str | None = option(None, "folder that image paths are relative to")
    streaming: bool = option(False, "read a Hugging Face hub dataset as a stream")
    allow_outside_paths: bool = option(False, "accept image paths outside the dataset folder and --image-root "
                                       "(e.g. absolute CSV paths)")
    classes: list[str] | None = option(None, "comma-separated class names (default: values with >= "
                                       "--min-class-count rows)", metavar="NAME,...")
    min_class_count: int = option(DEFAULT_MIN_CLASS_COUNT, "rows a label value needs to become a class", min=1)
    case_sensitive_labels: bool = option(False, "keep labels differing only in case apart (default: merged into "
                                         "the most frequent spelling)")
    n: int = option(DEFAULT_N, "labeled rows to sample (all when fewer)", min=1)
    seed: int = option(0, "seed of the split, the initialisations and the data order", min=0, max=MAX_SEED)
    objectives: tuple[str, ...] = option(REPRODUCE_OBJECTIVES, "fine-tuned models to compare with the base",
                                         choices=tuple(OBJECTIVES))
    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: dict[str, int] = field(default_factory=dict)  # per objective, overriding train.epochs
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    # Extra semantic runs with other target temperatures, reported beside the main one; none by default (the
    # comparison with MedCLIP's own tau_t = 1 is `--semantic-temperatures 1`, one more semantic run).
    semantic_temperatures: tuple[float, ...] = option((), "extra semantic runs with these target temperatures, "
                                                      "compared in the report (e.g. 1: MedCLIP's own; default none)",
                                                      above=0)
    methods: tuple[str, ...] = option((), "adaptation methods added to Table 1, each a run under runs/ ('all': "
                                      "every one)", choices=(*METHODS, "all"))
    # Every model is also scored zero-shot on these label fields of the source, where it has them (forgetting).
    other_label_fields: tuple[str, ...] = option(("modality",), "other label fields every model is also scored "
                                                 "on zero-shot, where the dataset has them ('' for none)")
    sweep: bool = option(False, "add the data-efficiency sweep (see `clipmed sweep`)")
    sweep_fractions: tuple[float, ...] = option((0.1, 0.25, 0.5, 1.0), "train shares of the sweep",
                                                flag="--fractions", above=0, max=1)
    suite: str | None = option(None, "also score every model on this benchmark suite and add its table to the "
                               "report (see `clipmed benchmark`)", metavar="SUITE.yaml")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_config(config: ReproduceConfig, prepared_dir: Path, run: Path, objective: str, **overrides) -> TrainConfig:
    """The training config of one objective's run: the shared training options, what the objective sets for
    its reproduce run, then `overrides`."""
    values = dict(data=str(prepared_dir), out=str(run), model=config.model, objective=objective, seed=config.seed,
                  epochs=config.epochs.get(objective, config.train.epochs))
    return replace(config.train, **{**values, **get_objective(objective).reproduce_overrides, **overrides})


def train_or_resume(train_config: TrainConfig, *, progress: bool = True) -> Path:
    """Train a run, resume it if it was interrupted, or leave it if it is complete."""
    run = Path(train_config.out)
    status = read_json(run / "run.json")["status"] if (run / "run.json").exists() else None
    if status != "done":
        _log(f"fine-tune: {train_config.objective} -> {run}" + (" (resuming)" if status else ""))
        train(train_config, resume=status is not None, progress=progress)
    return run


def reproduce(config: ReproduceConfig, *, progress: bool = True) -> dict:
    """The whole experiment into `config.out`, which is locked meanwhile (a second process is refused)."""
    with FileLock(config.out, what="reproduce"):
        return _reproduce(config, progress=progress)


def _reproduce(config: ReproduceConfig, *, progress: bool) -> dict:
    started = time.time()
    out = Path(config.out)
    prepared_dir = out / "prepared"
    if not (prepared_dir / "split.json").exists():
        _log("prepare")
        prepare(config.data, prepared_dir, fmt=config.fmt, fields=config.fields, image_root=config.image_root,
                streaming=config.streaming, allow_outside_paths=config.allow_outside_paths, classes=config.classes,
                min_class_count=config.min_class_count, case_sensitive_labels=config.case_sensitive_labels,
                n=config.n, seed=config.seed, progress=progress)
    prepared = load_prepared(prepared_dir)
    templates = load_templates(prepared.manifest["fields"]["label_field"] or "default")

    # report.html's gallery shows the caption model (the paper's question: how far captions alone go),
    # else the last fine-tuned model, else the base model.
    gallery_name = "caption" if "caption" in config.objectives else (config.objectives or ("base",))[-1]

    def evaluate(name: str, spec: str) -> None:
        _log(f"evaluate: {name}")
        # A spec with fresh parts (the dual default's projections) is initialised from the global RNG: seed it, so
        # the base row is the same model in every run, as the fine-tuned runs are (train() seeds the same way).
        torch.manual_seed(config.seed)
        model = load_model(spec)
        result, embeddings = full_evaluation(model, prepared.records("test"), prepared.records("train"),
                                             prepared.classes, templates, config.evaluation, progress=progress)
        results[name], test_embeddings[name] = result, embeddings
        for label_field, (records, classes) in other_fields.items():
            other.setdefault(name, {})[label_field] = zero_shot_evaluation(model, records, classes, config.evaluation)
        if name == gallery_name:
            galleries[name] = build_gallery(embeddings.images.numpy(), embeddings.texts.numpy(), embeddings.records,
                                            embeddings.scores, prepared.classes, logit_scale=model.scale().item(),
                                            seed=config.seed, model=name)

    results: dict[str, dict] = {}
    test_embeddings: dict[str, Embeddings] = {}
    galleries: dict[str, dict] = {}
    other: dict[str, dict] = {}
    other_fields = _other_label_fields(prepared, config)
    evaluate("base", config.model)
    runs = {}
    for objective in config.objectives:
        runs[objective] = train_or_resume(_train_config(config, prepared_dir, out / "runs" / objective, objective),
                                          progress=progress)
        evaluate(objective, str(runs[objective]))
    for method in expand_methods(config.methods):
        runs[method] = train_method(method, config, prepared_dir, runs, progress=progress)
        evaluate(method, str(runs[method]))

    metrics = {"models": results, "training": {name: _training_summary(run) for name, run in runs.items()}}
    if other:
        metrics["other_label_fields"] = other
    if "semantic" in config.objectives and config.semantic_temperatures:
        metrics["semantic_temperature"] = semantic_temperatures(prepared, out, config, results["semantic"],
                                                                progress=progress)
    figures = ["per_class.png", "embeddings.png"]
    per_class_figure(results, out / "per_class.png")
    labels = next(iter(test_embeddings.values())).labels
    embedding_figure({name: e.images.numpy() for name, e in test_embeddings.items()}, labels, prepared.classes,
                     out / "embeddings.png", seed=config.seed)
    if config.sweep:
        metrics["sweep"] = sweep(prepared, out, config, reuse=runs, progress=progress)
        figures.append("data_efficiency.png")
    if config.suite:
        _log(f"benchmark suite: {config.suite}")
        specs = {"base": config.model, **{name: str(run) for name, run in runs.items()}}
        bench = BenchmarkConfig(n_boot=config.evaluation.n_boot, seed=config.seed, precision=config.evaluation.precision)
        metrics["benchmark"] = run_benchmark(specs, load_suite(config.suite), bench, device=config.train.device,
                                             progress=progress)
        write_json_atomic(out / "benchmark" / "benchmark.json", metrics["benchmark"])
        write_benchmark_report(out / "benchmark", metrics["benchmark"])
    write_json_atomic(out / "metrics.json", metrics)
    elapsed = time.time() - started
    context = _report_context(config, prepared, elapsed, figures)
    write_report(out, metrics, context)
    write_html_report(out, metrics, context, galleries.get(gallery_name))
    _log(f"done in {elapsed / 60:.1f} min: {out / 'report.md'} and {out / 'report.html'}")
    return metrics


def expand_methods(methods: tuple[str, ...]) -> list[str]:
    """The --methods list with 'all' replaced by every method, in METHODS order, each once."""
    wanted = set(METHODS) if "all" in methods else set(methods)
    return [name for name in METHODS if name in wanted]


def train_method(method: str, config: ReproduceConfig, prepared_dir: Path, runs: dict[str, Path], *,
                 progress: bool = True) -> Path:
    """Train (or resume, or keep) the run of one adaptation method: out/runs/<method>."""
    root = Path(config.out) / "runs"
    values = dict(METHODS[method])
    objective = values.pop("objective")
    # Options typed for the shared training (a LoRA rank, LP epochs) win over the method's own.
    values = {key: getattr(config.train, key) or value for key, value in values.items()}
    if method != "label-wise-ft":
        return train_or_resume(_train_config(config, prepared_dir, root / method, objective, **values),
                               progress=progress)
    # WiSE-FT: the label model starts from the caption run and is interpolated back towards it.
    caption = runs.get("caption") or train_or_resume(_train_config(config, prepared_dir, root / "caption", "caption"),
                                                     progress=progress)
    finetuned = train_or_resume(_train_config(config, prepared_dir, root / WISE_FT_START, objective,
                                              init=str(caption), **values), progress=progress)
    _log(f"wise-ft: {caption} -> {finetuned} -> {root / method}")
    return wise_ft(WiseFTConfig(base=str(caption), finetuned=str(finetuned), data=str(prepared_dir),
                                out=str(root / method), seed=config.seed, precision=config.evaluation.precision))


def _training_summary(run: Path) -> dict:
    """Trainable parameters and training time of a run, for the report."""
    saved = read_json(run / "run.json")
    return {"trainable_parameters": saved.get("trainable_parameters"), "seconds": saved.get("seconds"),
            "wise_ft_alpha": saved.get("wise_ft", {}).get("chosen")}


def _other_label_fields(prepared: PreparedData, config: ReproduceConfig) -> dict[str, tuple[list, list[str]]]:
    """{field: (test records labeled by it, its classes)} for the other label fields the prepared rows have."""
    found = {}
    for label_field in config.other_label_fields:
        if label_field == prepared.manifest["fields"]["label_field"]:
            continue
        try:
            records, classes, _ = labeled_split(prepared, "test", label_field, min_class_count=config.min_class_count)
        except ClipmedError as exc:  # the dataset has no such field, or too few classes of it
            _log(f"not scoring label field {label_field!r}: {exc}")
            continue
        found[label_field] = (records, classes)
    return found


def semantic_temperatures(prepared: PreparedData, out: Path, config: ReproduceConfig, main_result: dict, *,
                          progress: bool = True) -> dict:
    """{tau_t: zero-shot test metrics} for the main semantic run and one run per extra temperature."""
    results = {f"{config.train.semantic_temperature:g}": main_result}
    for tau in config.semantic_temperatures:
        if tau == config.train.semantic_temperature:
            continue
        run = train_or_resume(_train_config(config, prepared.directory, out / "runs" / f"semantic-tau{tau:g}",
                                            "semantic", semantic_temperature=tau), progress=progress)
        results[f"{tau:g}"] = zero_shot_evaluation(load_model(str(run)), prepared.records("test"), prepared.classes,
                                                   config.evaluation)
    return results


def sweep(prepared: PreparedData, out: Path, config: ReproduceConfig, *, reuse: dict[str, Path] | None = None,
          progress: bool = True) -> dict:
    """Data efficiency (MedCLIP's figure): zero-shot top-1 on test against growing shares of the train data.

    Writes out/sweep/<objective>-<fraction>/ runs, out/data_efficiency.png, and returns
    {objective: [{"fraction", "n_train", "top1", "ci95"}]}.
    """
    reuse = reuse or {}
    points: dict[str, list[dict]] = {}
    for objective in config.objectives:
        for fraction in config.sweep_fractions:
            run = reuse.get(objective) if fraction == 1.0 else None
            if run is None:
                run = train_or_resume(_train_config(config, prepared.directory, out / "sweep" / f"{objective}-{fraction:g}",
                                                    objective, fraction=fraction), progress=progress)
            result = zero_shot_evaluation(load_model(str(run)), prepared.records("test"), prepared.classes,
                                          config.evaluation)
            points.setdefault(objective, []).append({"fraction": fraction, "n_train": read_json(run / "run.json")["n_training_rows"],
                                                     "top1": result["top1"], "ci95": result["ci95"]["top1"]})
    data_efficiency_figure({objective: [(p["n_train"], p["top1"], *p["ci95"]) for p in rows]
                            for objective, rows in points.items()}, out / "data_efficiency.png")
    return points


def _report_context(config: ReproduceConfig, prepared: PreparedData, elapsed: float, figures: list[str]) -> dict:
    label_field = prepared.manifest["fields"]["label_field"]
    notes = {}
    if config.model.startswith("dual:"):
        notes["base"] = ("the dual default's projections are freshly initialised, so the base model is an untrained "
                         "projection: chance level by construction")
    if "semantic" in config.objectives:
        notes["semantic"] = (f"concepts from captions only, target temperature "
                             f"{config.train.semantic_temperature:g}, checkpoint chosen without labels")
    return {
        "dataset": config.data,
        "label_field": label_field,
        "label_source": (f"the `{label_field}` field of the source, cleaned to the classes "
                         + (f"with at least {config.min_class_count} rows" if not config.classes else "given")
                         + ". Check how that field was made: labels derived from the captions themselves (keyword "
                           "rules in roco-radiology, a model's annotations in PubMedVision) are weak and favour "
                           "caption-trained models"),
        "counts": prepared.manifest["counts"],
        "model": config.model,
        "notes": notes,
        "elapsed_s": elapsed,
        "figures": figures,
        "command": " ".join(sys.argv),
    }
