"""The `clipmed` command line: a thin layer that turns flags into the library's config dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ClipmedError
from .io import check_output, read_json
from .options import add_options, checked, from_args
from .processes import keep_freed_memory


def _add_data_options(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The same data options on every command: the field names (FieldMap) and how the source is read."""
    from .data.records import FieldMap
    from .pipeline import SOURCE_OPTIONS, ReproduceConfig

    group = parser.add_argument_group("data")
    add_options(group, ReproduceConfig, only=SOURCE_OPTIONS)
    add_options(group, FieldMap, prefix=prefix)


def _source_options(args: argparse.Namespace) -> dict:
    """The keyword arguments every command passes to `load_source` (and prepare, load_for_evaluation)."""
    return dict(fmt=args.fmt, fields=_fields(args), image_root=args.image_root, streaming=args.streaming,
                allow_outside_paths=args.allow_outside_paths)


def _fields(args: argparse.Namespace, prefix: str = ""):
    from .data.records import FieldMap

    return from_args(FieldMap, args, prefix=prefix)


# The image store's options, on every command that reads images through it (declared on TrainConfig).
STORE_OPTIONS = ("store", "store_format", "workers", "loader_workers")


def _add_store_options(group) -> None:
    from .training.config import TrainConfig

    add_options(group, TrainConfig, only=STORE_OPTIONS)


def _store_options(args: argparse.Namespace):
    from .data.store import StoreOptions

    return StoreOptions(root=args.store, format=args.store_format, workers=args.workers)


def _add_train_options(parser: argparse.ArgumentParser, *, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
    from .training.config import TrainConfig

    add_options(parser.add_argument_group("training"), TrainConfig, prefix=prefix, exclude=exclude)


def _typed_options(argv: list[str] | None) -> set[str]:
    """Dests of the options typed on the command line, which a --config recipe yields to: the command line
    parsed again with every default suppressed, so that argparse sets only what it was given."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action.choices, dict):  # the sub-command parsers
                parsers += action.choices.values()
    return set(vars(parser.parse_args(argv)))


def _recipe_paths(typed: set[str], config) -> set[str]:
    """The typed options that are config values: a dest is the option's dotted path in `config` ("train.epochs",
    "fields.label_field", "epochs.caption"), so only options that are no config field (--config) drop out."""
    from dataclasses import fields

    names = {f.name for f in fields(config)}
    return {dest for dest in typed if dest.split(".")[0] in names}


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data.split import prepare

    check_output(args.out, folder=True)
    summary = prepare(args.data, args.out, **_source_options(args), classes=args.classes,
                      min_class_count=args.min_class_count, case_sensitive_labels=args.case_sensitive_labels,
                      n=args.n, seed=args.seed, strict=args.strict, check_images=args.check_images,
                      workers=args.workers)
    print(json.dumps(summary, indent=2, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> None:
    from .training.config import TrainConfig
    from .training.train import train

    if args.resume == "":
        raise ClipmedError("--resume needs the run folder to continue")
    if args.resume or args.out:
        check_output(args.resume or args.out, folder=True, flag="--resume" if args.resume else "--out")
    if args.resume:
        if args.config:
            raise ClipmedError("--resume continues a run with its saved config: drop --config")
        run = train(from_args(TrainConfig, args, out=args.resume), resume=True)
    else:
        if not (args.data and args.out):
            raise ClipmedError("train needs --data PREPARED_DIR and --out RUN (or --resume RUN)")
        config = from_args(TrainConfig, args)
        if args.config:
            from .config_files import load_recipe, recipe_train_config, with_overrides

            config = with_overrides(recipe_train_config(load_recipe(args.config)), config,
                                    _recipe_paths(args.typed, config))
        run = train(config)
    print(f"run written to {run}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data.records import FieldMap
    from .data.split import load_for_evaluation, load_prepared
    from .evaluation.evaluate import EvalConfig, full_evaluation, labeled_split
    from .io import write_json_atomic
    from .knowledge import load_templates
    from .models import load_model

    if args.out:
        check_output(args.out, folder=False)
    if (Path(args.data) / "split.json").exists():
        if args.split == "all":
            raise ClipmedError(f"{args.data} is a prepared folder: use --split test or val (--split all is for a "
                               "dataset that was never prepared)")
        prepared = load_prepared(args.data)
        label_field = args.label_field or prepared.manifest["fields"]["label_field"]
        records, classes, train = labeled_split(prepared, args.split, label_field, classes=args.classes,
                                                min_class_count=args.min_class_count)
    else:
        if args.split != "all":
            raise ClipmedError(f"{args.data} has no split.json: run `clipmed prepare` first, or pass --split all "
                               "to score every labeled row")
        label_field = args.label_field = args.label_field or FieldMap().label_field
        records, classes = load_for_evaluation(args.data, **_source_options(args), classes=args.classes,
                                               min_class_count=args.min_class_count,
                                               case_sensitive_labels=args.case_sensitive_labels)
        train = None  # a dataset never prepared has no train split for the linear probe
    config = from_args(EvalConfig, args)  # checks the template before the model loads
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result, _ = full_evaluation(model, records, train, classes, load_templates(label_field or "default", args.templates),
                                config, progress=True)
    if args.out:
        write_json_atomic(args.out, result)
    print(f"n={result['n']} top1={result['top1']:.3f} {result['ci95']['top1']} top3={result['top3']:.3f} "
          f"macro_f1={result['macro_f1']:.3f} ensemble_top1={result['ensemble']['top1']:.3f} "
          f"mean_R@1={result['retrieval']['mean_recall_at_1']:.3f}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from .devices import check_device
    from .evaluation.benchmark import BenchmarkConfig, load_suite, model_names, run_benchmark
    from .io import write_json_atomic
    from .locking import FileLock
    from .report.benchmark import BENCHMARK_MD, write_benchmark_report

    check_output(args.out, folder=True)
    check_device(args.device)
    suite = load_suite(args.suite)
    models = model_names(args.model)
    config = from_args(BenchmarkConfig, args)
    out = Path(args.out)
    with FileLock(out, what="benchmark"):
        result = run_benchmark(models, suite, config, device=args.device, trust_remote_code=args.trust_remote_code,
                               progress=True)
        write_json_atomic(out / "benchmark.json", result)
        write_benchmark_report(out, result)
    for name in models:
        parts = []
        for key, value in result["average"][name].items():
            if value is not None:
                lo, hi = value["ci95"]
                parts.append(f"{key} {100 * value['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        print(f"{name}: " + "; ".join(parts))
    print(f"report: {out / BENCHMARK_MD}")


def cmd_wise_ft(args: argparse.Namespace) -> None:
    from .training.wise_ft import WiseFTConfig, wise_ft

    config = from_args(WiseFTConfig, args)
    missing = [flag for flag in ("base", "finetuned", "data", "out") if not getattr(config, flag)]
    if missing:
        raise ClipmedError(f"wise-ft needs {', '.join('--' + m for m in missing)}")
    if not config.alphas:
        raise ClipmedError("--alphas needs at least one mixing weight, e.g. 0,0.25,0.5,0.75,1")
    check_output(config.out, folder=True)
    run = wise_ft(config)
    chosen = read_json(run / "run.json")["wise_ft"]
    for point in chosen["alphas"]:
        print(f"a={point['alpha']:<5g} val top-1 {point['val_zero_shot_top1']:.3f}  val R@1 "
              f"{point['val_mean_recall_at_1']:.3f}  mean {point['score']:.3f}")
    print(f"chose a={chosen['chosen']:g}; run written to {run}")


def cmd_entities(args: argparse.Namespace) -> None:
    from .data.sources import load_source
    from .knowledge import ConceptExtractor, Vocabulary, coverage, format_coverage

    loaded = load_source(args.data, **_source_options(args))
    vocabulary = Vocabulary.load(args.vocabulary) if args.vocabulary else Vocabulary.default()
    report = coverage([r.caption for r in loaded.records], ConceptExtractor(vocabulary))
    print(json.dumps(report, indent=2) if args.json else format_coverage(report))


def _reproduce_config(args: argparse.Namespace):
    """ReproduceConfig from the flags of `reproduce` or `sweep` (dests are config paths: "train.epochs", ...)."""
    from .objectives import OBJECTIVES
    from .pipeline import ReproduceConfig
    from .training.config import TrainConfig

    epochs = {name: getattr(args, f"epochs.{name}") for name in OBJECTIVES
              if getattr(args, f"epochs.{name}", None) is not None}
    return from_args(ReproduceConfig, args, fields=_fields(args, "fields."),
                     train=from_args(TrainConfig, args, prefix="train."), epochs=epochs)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .devices import check_device
    from .pipeline import reproduce

    config = _reproduce_config(args)
    if args.config:
        from .config_files import load_recipe, with_overrides

        config = with_overrides(load_recipe(args.config), config, _recipe_paths(args.typed, config))
    if not (config.data and config.out):
        raise ClipmedError("reproduce needs --data and --out (or `data:` and `out:` in the --config recipe)")
    check_output(config.out, folder=True)
    check_device(config.train.device)
    started = time.time()
    metrics = reproduce(config)
    for name, result in metrics["models"].items():
        lo, hi = result["ci95"]["top1"]
        print(f"{name:>8}: top-1 {100 * result['top1']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]  top-3 "
              f"{100 * result['top3']:.1f}%")
    print(f"elapsed {time.time() - started:.0f} s; report: {Path(config.out) / 'report.md'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .data.split import load_prepared
    from .io import write_json_atomic
    from .pipeline import sweep

    check_output(args.out, folder=True)
    if not (args.data and args.out):
        raise ClipmedError("sweep needs --data PREPARED_DIR and --out FOLDER")
    config = _reproduce_config(args)
    points = sweep(load_prepared(args.data), Path(args.out), config)
    write_json_atomic(Path(args.out) / "sweep.json", points)
    for objective, rows in points.items():
        for point in rows:
            lo, hi = point["ci95"]
            print(f"{objective:>9} {point['fraction']:>5g} n={point['n_train']:>5}: top-1 {100 * point['top1']:.1f}% "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    print(f"figure: {Path(args.out) / 'data_efficiency.png'}")


def _add_inference_options(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    from .evaluation.evaluate import EvalConfig
    from .training.config import TrainConfig

    parser.add_argument("--model", required=True, help="a run folder, a saved model folder or a model spec")
    if precision:
        add_options(parser, EvalConfig, only=("precision",))
    add_options(parser, TrainConfig, only=("device",))


def _inference_model(args: argparse.Namespace):
    from .devices import check_device
    from .models import load_model

    device = check_device(args.device)
    return load_model(args.model).to(device)


def cmd_predict(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .inference import format_predictions, predict
    from .knowledge import load_templates
    from .knowledge.prompts import DEFAULT_TEMPLATE

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if args.templates and args.template:
        raise ClipmedError("pass --template (one prompt) or --templates FILE (a prompt ensemble), not both")
    templates = load_templates("default", args.templates) if args.templates else [args.template or DEFAULT_TEMPLATE]
    predictions = predict(_inference_model(args), args.images, labels, templates=templates, top_k=args.top_k,
                          precision=args.precision)
    print(json.dumps([asdict(p) for p in predictions], indent=2) if args.json else format_predictions(predictions))


def _report_skipped(skipped: list[tuple[str, str]], what: str) -> None:
    for rec_id, reason in skipped[:5]:
        print(f"skipped {rec_id}: {reason}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"... and {len(skipped) - 5} more rows {what}", file=sys.stderr)


def _start_loader_server(args: argparse.Namespace) -> None:
    """Let the loader workers' server import torch while the command reads its data and model."""
    if args.loader_workers != 0:
        from .processes import start_loader_server

        start_loader_server()


def cmd_embed(args: argparse.Namespace) -> None:
    from .data.sources import load_source
    from .inference import write_embeddings

    check_output(args.out, folder=False)
    _start_loader_server(args)
    loaded = load_source(args.data, **_source_options(args))
    embedded = write_embeddings(_inference_model(args), loaded, args.out, what=args.what, precision=args.precision,
                                progress=True, store=_store_options(args), loader_workers=args.loader_workers)
    _report_skipped(embedded.skipped_images, "without a readable image")
    print(f"{embedded.images} image and {embedded.texts} text embeddings written to "
          f"{args.out}; skipped {len(embedded.skipped_images)} rows without a readable image and "
          f"{embedded.skipped_texts} without a caption")


def cmd_index(args: argparse.Namespace) -> None:
    from .data.sources import load_source
    from .inference import build_index, model_reference

    check_output(args.out, folder=True)
    _start_loader_server(args)
    loaded = load_source(args.data, **_source_options(args))
    indexed = build_index(_inference_model(args), model_reference(args.model), loaded, args.out,
                          precision=args.precision, progress=True, store=_store_options(args),
                          loader_workers=args.loader_workers)
    _report_skipped(indexed.skipped_images, "without a readable image")
    print(f"indexed {indexed.images} images into {args.out} (skipped {len(indexed.skipped_images)} without a "
          "readable image)")


def cmd_search(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .inference import check_model, format_hits, load_index, search

    index = load_index(args.index)
    model = _inference_model(args)
    check_model(index, model, args.model)
    hits = search(model, index, text=args.query, image=args.image, k=args.top_k)
    print(json.dumps([asdict(h) for h in hits], indent=2) if args.json else format_hits(hits))


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model
    from .models import load_model

    check_output(args.dir, folder=True, flag="export DIR")
    out = export_model(load_model(args.run), args.dir, source=args.run)
    print(f"exported to {out}; {out / 'README.md'} shows how to load it without clipmed")


class _Parser(argparse.ArgumentParser):
    """argparse with clipmed's one-line errors: a bad flag or value gives `clipmed: error: ...` and status 2, the
    usage left to --help (argparse would print the whole usage first; the sub-command parsers inherit this)."""

    def error(self, message: str):
        self.exit(2, f"clipmed: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.benchmark import BenchmarkConfig
    from .evaluation.evaluate import EvalConfig
    from .objectives import OBJECTIVES
    from .pipeline import SOURCE_OPTIONS, ReproduceConfig
    from .training.config import PER_RUN_FIELDS, TrainConfig
    from .training.wise_ft import WiseFTConfig

    # reproduce and sweep set these per run; reproduce's own --suite scores every model it trains.
    shared_training = (*PER_RUN_FIELDS, "suite", "select_by_suite")

    parser = _Parser(prog="clipmed", description="Adapt CLIP-style image-text models to medical "
                                     "imaging and measure, with confidence intervals, how much each adaptation helps.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="validate a dataset and write its split manifest (split.json)")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    add_options(p, ReproduceConfig, only=("n", "seed"))
    p.add_argument("--strict", action="store_true", help="turn skipped rows into errors")
    p.add_argument("--workers", type=checked(int, min=1), help="processes that decode images (default: one per core)")
    p.add_argument("--no-image-check", dest="check_images", action="store_false",
                   help="only check that image files exist, without decoding them (a fast metadata-only prepare)")
    _add_data_options(p)
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("train", help="fine-tune a model on a prepared dataset")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--config", metavar="FILE", help="a recipe (configs/*.yaml): its training section, model and "
                   "seed; options typed here override it")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="zero-shot classification metrics with bootstrap intervals")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a prepared folder, or any dataset with --split all")
    p.add_argument("--split", choices=["test", "val", "all"], default="test")
    p.add_argument("--out", help="write the metrics JSON here")
    add_options(p, EvalConfig)
    p.add_argument("--templates", help="a prompt-ensemble YAML replacing the packaged one (label field -> templates)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    _add_data_options(p)
    p.set_defaults(func=cmd_evaluate, label_field=None)

    p = commands.add_parser("sweep", help="data efficiency: zero-shot top-1 against growing shares of train data")
    add_options(p, ReproduceConfig, only=("data", "out", "model", "seed", "objectives", "sweep_fractions"))
    _add_train_options(p, prefix="train.", exclude=shared_training)
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("benchmark", help="zero-shot scores of several models on every dataset of a suite")
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="[NAME=]MODEL",
                   help="run folders, saved models or specs; NAME= sets the column name (default: the folder's name)")
    p.add_argument("--suite", required=True, help="a suite YAML (configs/suites/roco.yaml shows the keys)")
    p.add_argument("--out", required=True, help="folder for benchmark.json, benchmark.md and benchmark.html")
    add_options(p, BenchmarkConfig)
    add_options(p, TrainConfig, only=("device",))
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    p.set_defaults(func=cmd_benchmark)

    p = commands.add_parser("wise-ft", help="WiSE-FT: interpolate a base and a fine-tuned model's weights, the "
                            "mixing weight chosen on the validation split")
    add_options(p, WiseFTConfig)
    p.set_defaults(func=cmd_wise_ft)

    p = commands.add_parser("entities", help="concept coverage of a dataset's captions (knowledge extraction)")
    p.add_argument("data")
    p.add_argument("--vocabulary", help="a concepts YAML replacing the packaged vocabulary")
    p.add_argument("--json", action="store_true")
    _add_data_options(p)
    p.set_defaults(func=cmd_entities)

    p = commands.add_parser("reproduce", help="the paper's experiment end to end, with a report")
    p.add_argument("--config", metavar="FILE", help="a recipe (configs/*.yaml); options typed here override it")
    add_options(p, ReproduceConfig, exclude=SOURCE_OPTIONS)
    for name in OBJECTIVES:
        p.add_argument(f"--{name}-epochs", dest=f"epochs.{name}", type=checked(int, min=1), metavar="N",
                       help=f"epochs of the {name} run (default: --epochs)")
    _add_data_options(p, prefix="fields.")
    _add_train_options(p, prefix="train.", exclude=shared_training)
    p.set_defaults(func=cmd_reproduce)

    p = commands.add_parser("predict", help="the most probable of some labels for each image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "Chest,Abdomen,Head"')
    p.add_argument("--template", help='the prompt, with {label} (default: "A medical image of {label}")')
    p.add_argument("--templates", help="a prompt ensemble: a templates YAML as --templates of evaluate, whose "
                   "`default` list is used (each label's embedding is the mean over them)")
    p.add_argument("--top-k", type=checked(int, min=1), default=3)
    p.add_argument("--json", action="store_true")
    _add_inference_options(p)
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("embed", help="image and/or caption embeddings of a dataset, as Parquet")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="a .parquet file: columns id, kind, embedding")
    p.add_argument("--what", choices=["images", "texts", "both"], default="both")
    _add_inference_options(p)
    _add_data_options(p)
    _add_store_options(p.add_argument_group("image store"))
    p.set_defaults(func=cmd_embed, label_field=None)

    p = commands.add_parser("index", help="an image embedding index of a dataset, for `clipmed search`")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="index folder")
    _add_inference_options(p)
    _add_data_options(p)
    _add_store_options(p.add_argument_group("image store"))
    p.set_defaults(func=cmd_index, label_field=None)

    p = commands.add_parser("search", help="the indexed images nearest to a text or to an image")
    p.add_argument("query", nargs="?", help="query text (or pass --image)")
    p.add_argument("--image", help="query image: image-to-image search")
    p.add_argument("--index", required=True, help="folder written by `clipmed index`")
    p.add_argument("--top-k", type=checked(int, min=1), default=5)
    p.add_argument("--json", action="store_true")
    _add_inference_options(p, precision=False)
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("export", help="a model in its own library's format, loadable without clipmed")
    p.add_argument("run", help="a run folder, a saved model folder or a model spec")
    p.add_argument("dir", help="new (or empty) output folder")
    p.set_defaults(func=cmd_export)
    return parser


# What each command is doing, for the out-of-memory message.
_ACTIVITY = {"prepare": "preparing the data", "train": "training", "wise-ft": "interpolating weights",
             "evaluate": "evaluating", "sweep": "running the sweep", "benchmark": "benchmarking",
             "reproduce": "running reproduce", "entities": "extracting entities", "predict": "predicting",
             "embed": "embedding", "index": "indexing", "search": "searching", "export": "exporting"}
# Messages of allocation failures that torch raises as a plain RuntimeError (CPU, MPS, older CUDA builds).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (torch.OutOfMemoryError, MemoryError or torch's RuntimeError)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_MESSAGES)


def out_of_memory_message(args: argparse.Namespace) -> str:
    """One line: what ran out of memory, and the options of this command that need less of it."""
    activity = _ACTIVITY.get(args.command, f"running {args.command}")
    fixes = [flag for attribute, flag in (("batch_size", "a smaller --batch-size"),
                                          ("grad_checkpointing", "--grad-checkpointing"),
                                          ("accum_steps", "--accum-steps")) if hasattr(args, attribute)]
    if not fixes:
        hint = "free memory held by other processes, or use a device with more memory"
    elif len(fixes) == 1:
        hint = f"try {fixes[0]}"
    else:
        hint = f"try {', '.join(fixes[:-1])} or {fixes[-1]}"
    return f"out of memory while {activity}; {hint}"


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (ClipmedError) or running out of memory prints one line on stderr,
    `clipmed: error: <what is wrong>; <how to fix it>`, and returns 2; an interruption returns 130."""
    from transformers.utils import logging as hf_logging

    # transformers' weight-loading reports and download/save progress bars are noise for a CLI user.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    keep_freed_memory()  # every command's steps reuse their pages (clipmed.processes)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args.typed = _typed_options(argv)
    try:
        args.func(args)
    except ClipmedError as exc:
        print(f"clipmed: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run = getattr(args, "resume", None) or getattr(args, "out", None)
        started = args.command == "train" and run and (Path(run) / "run.json").is_file()
        resume = f"; continue with `clipmed train --resume {run}`" if started else ""
        print(f"clipmed: interrupted{resume}", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"clipmed: error: {out_of_memory_message(args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
