"""`clipmed reproduce`: the paper's experiment on any dataset of its shape, resumable step by step.

prepare -> evaluate the base model -> fine-tune on captions -> fine-tune on labels -> evaluate all on test ->
report (Table 1, per-class figure, data counts). Every step skips work whose complete output already exists,
so an interrupted reproduce continues where it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .data.records import FieldMap
from .data.split import load_prepared, prepare
from .evaluation.evaluate import EvalConfig, zero_shot_evaluation
from .io import read_json, write_json_atomic
from .models import DEFAULT_SPEC, load_model
from .report.figures import per_class_figure
from .report.markdown import write_report
from .training.config import TrainConfig
from .training.train import train

FINE_TUNED = ("caption", "label")


@dataclass
class ReproduceConfig:
    data: str
    out: str
    model: str = DEFAULT_SPEC
    fmt: str | None = None
    fields: FieldMap = field(default_factory=FieldMap)
    image_root: str | None = None
    classes: list[str] | None = None
    min_class_count: int = 20
    n: int = 4096
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    caption_epochs: int | None = None
    label_epochs: int | None = None
    evaluation: EvalConfig = field(default_factory=EvalConfig)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reproduce(config: ReproduceConfig, *, progress: bool = True) -> dict:
    started = time.time()
    out = Path(config.out)
    prepared_dir = out / "prepared"
    if not (prepared_dir / "split.json").exists():
        _log("[1/5] prepare")
        prepare(config.data, prepared_dir, fmt=config.fmt, fields=config.fields, image_root=config.image_root,
                classes=config.classes, min_class_count=config.min_class_count, n=config.n, seed=config.seed,
                progress=progress)
    prepared = load_prepared(prepared_dir)
    test = prepared.records("test")

    def evaluate(model_spec: str) -> dict:
        model = load_model(model_spec)
        return zero_shot_evaluation(model, test, prepared.classes, config.evaluation, progress=progress)

    results = {}
    _log(f"[2/5] evaluate the base model {config.model}")
    results["base"] = evaluate(config.model)
    for index, objective in enumerate(FINE_TUNED, start=3):
        run = out / "runs" / objective
        epochs = {"caption": config.caption_epochs, "label": config.label_epochs}[objective]
        train_config = replace(config.train, data=str(prepared_dir), out=str(run), model=config.model,
                               objective=objective, seed=config.seed,
                               epochs=epochs if epochs is not None else config.train.epochs)
        status = read_json(run / "run.json")["status"] if (run / "run.json").exists() else None
        if status != "done":
            _log(f"[{index}/5] fine-tune on {objective}s" + (" (resuming)" if status else ""))
            train(train_config, resume=status is not None, progress=progress)
        results[objective] = evaluate(str(run))

    metrics = {"models": results}
    write_json_atomic(out / "metrics.json", metrics)
    per_class_figure(results, out / "per_class.png")
    elapsed = time.time() - started
    write_report(out, metrics, _report_context(config, prepared, elapsed))
    _log(f"done in {elapsed / 60:.1f} min: {out / 'report.md'}")
    return metrics


def _report_context(config: ReproduceConfig, prepared, elapsed: float) -> dict:
    manifest = prepared.manifest
    notes = {}
    if config.model.startswith("dual:"):
        notes["base"] = ("the dual default's projections are freshly initialised, so the base model is an untrained "
                         "projection: chance level by construction")
    return {
        "dataset": config.data,
        "label_field": config.fields.label_field,
        "label_source": f"the `{config.fields.label_field}` field of the source, cleaned to classes "
                        f"with at least {config.min_class_count} rows" if not config.classes else
                        f"the `{config.fields.label_field}` field, restricted to the given classes",
        "counts": manifest["counts"],
        "model": config.model,
        "notes": notes,
        "elapsed_s": elapsed,
        "figures": ["per_class.png"],
        "command": " ".join(sys.argv),
    }
