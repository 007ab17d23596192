"""The `clipmed` command line: a thin layer that turns flags into the library's config dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ClipmedError


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """The same data options on every command."""
    group = parser.add_argument_group("data")
    group.add_argument("--format", dest="fmt", choices=["imagefolder", "pubmedvision", "csv", "hf"],
                       help="source format (default: detected from the path)")
    group.add_argument("--image-root", help="folder that image paths are relative to")
    group.add_argument("--caption-field", default="caption")
    group.add_argument("--label-field", default="body_part")
    group.add_argument("--image-field", default="file_name")
    group.add_argument("--group-field", help="rows sharing this value never straddle splits (roco: article)")
    group.add_argument("--id-field", default="id")
    group.add_argument("--classes", help="comma-separated class names (default: values with >= --min-class-count rows)")
    group.add_argument("--min-class-count", type=int, default=20)


def _fields(args: argparse.Namespace):
    from .data.records import FieldMap

    return FieldMap(caption_field=args.caption_field, label_field=args.label_field, image_field=args.image_field,
                    group_field=args.group_field, id_field=args.id_field)


def _classes(args: argparse.Namespace) -> list[str] | None:
    return [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None


def _add_train_options(parser: argparse.ArgumentParser, *, objective: bool) -> None:
    from .training.config import TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    if objective:
        group.add_argument("--objective", choices=["caption", "label", "semantic"], default=defaults.objective)
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--lr-clip", type=float, help="rate for weights of a pretrained CLIP (default: CLIP's "
                       "pretraining rate 5e-4 scaled by batch/32768)")
    group.add_argument("--lr-pretrained", type=float, default=defaults.lr_pretrained,
                       help="rate for towers pretrained alone (ImageNet CNN, MiniLM)")
    group.add_argument("--lr-new", type=float, default=defaults.lr_new, help="rate for fresh projections and temperature")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    group.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    group.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    group.add_argument("--update-batchnorm", action="store_true",
                       help="update BatchNorm running statistics while training (default: frozen)")
    group.add_argument("--label-template", default=defaults.label_template)
    group.add_argument("--label-targets", choices=["multi", "naive"], default=defaults.label_targets)
    group.add_argument("--semantic-temperature", type=float, default=defaults.semantic_temperature,
                       help="tau_t of the semantic matching targets softmax(s / tau_t)")
    group.add_argument("--entities-from", choices=["captions", "labels", "both"], default=defaults.entities_from)
    group.add_argument("--vocabulary", help="a concepts YAML replacing the packaged vocabulary")
    group.add_argument("--precision", choices=["bf16", "fp32"], default=defaults.precision)
    group.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    group.add_argument("--max-steps", type=int)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--device", default=defaults.device)


def _train_config(args: argparse.Namespace, **overrides):
    from .training.config import TrainConfig

    values = dict(epochs=args.epochs, batch_size=args.batch_size, lr_clip=args.lr_clip, lr_pretrained=args.lr_pretrained,
                  lr_new=args.lr_new, weight_decay=args.weight_decay, warmup_fraction=args.warmup_fraction,
                  lock_image=args.lock_image, lock_text=args.lock_text, freeze_batchnorm=not args.update_batchnorm,
                  label_template=args.label_template, label_targets=args.label_targets,
                  semantic_temperature=args.semantic_temperature, entities_from=args.entities_from,
                  vocabulary=args.vocabulary, precision=args.precision,
                  checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, seed=args.seed, device=args.device)
    values.update(overrides)
    return TrainConfig(**values)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data.split import prepare

    summary = prepare(args.data, args.out, fmt=args.fmt, fields=_fields(args), image_root=args.image_root,
                      classes=_classes(args), min_class_count=args.min_class_count, n=args.n, seed=args.seed,
                      strict=args.strict)
    print(json.dumps(summary, indent=2, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> None:
    from .training.train import train

    if args.resume:
        run = train(_train_config(args, out=args.resume), resume=True)
    else:
        if not (args.data and args.out):
            raise ClipmedError("train needs --data PREPARED_DIR and --out RUN (or --resume RUN)")
        run = train(_train_config(args, data=args.data, out=args.out, model=args.model, objective=args.objective))
    print(f"run written to {run}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data.split import load_for_evaluation, load_prepared
    from .evaluation.evaluate import EvalConfig, zero_shot_evaluation
    from .io import write_json_atomic
    from .models import load_model

    if (Path(args.data) / "split.json").exists():
        if args.split == "all":
            raise ClipmedError(f"{args.data} is a prepared folder: use --split test or val (--split all is for a "
                               "dataset that was never prepared)")
        prepared = load_prepared(args.data)
        label_field = prepared.manifest["fields"]["label_field"]
        if args.label_field not in (None, label_field):
            raise ClipmedError(f"{args.data} was prepared with label field {label_field!r}, not {args.label_field!r}: "
                               "prepare the dataset again with that --label-field")
        records, classes = prepared.records(args.split), prepared.classes
    else:
        if args.split != "all":
            raise ClipmedError(f"{args.data} has no split.json: run `clipmed prepare` first, or pass --split all "
                               "to score every labeled row")
        args.label_field = args.label_field or "body_part"
        records, classes = load_for_evaluation(args.data, fmt=args.fmt, fields=_fields(args), image_root=args.image_root,
                                               classes=_classes(args), min_class_count=args.min_class_count)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    config = EvalConfig(template=args.template, precision=args.precision)
    result = zero_shot_evaluation(model, records, classes, config, progress=True)
    if args.out:
        write_json_atomic(args.out, result)
    print(f"n={result['n']} top1={result['top1']:.3f} {result['ci95']['top1']} top3={result['top3']:.3f} "
          f"macro_f1={result['macro_f1']:.3f}")


def cmd_entities(args: argparse.Namespace) -> None:
    from .data.sources import load_source
    from .knowledge import ConceptExtractor, Vocabulary, coverage, format_coverage

    loaded = load_source(args.data, fmt=args.fmt, fields=_fields(args), image_root=args.image_root)
    vocabulary = Vocabulary.load(args.vocabulary) if args.vocabulary else Vocabulary.default()
    report = coverage([r.caption for r in loaded.records], ConceptExtractor(vocabulary))
    print(json.dumps(report, indent=2) if args.json else format_coverage(report))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .pipeline import ReproduceConfig, reproduce

    epochs = {name: value for name, value in (("caption", args.caption_epochs), ("label", args.label_epochs),
                                              ("semantic", args.semantic_epochs)) if value is not None}
    config = ReproduceConfig(data=args.data, out=args.out, model=args.model, fmt=args.fmt, fields=_fields(args),
                             image_root=args.image_root, classes=_classes(args), min_class_count=args.min_class_count,
                             n=args.n, seed=args.seed, objectives=tuple(args.objectives.split(",")),
                             train=_train_config(args), epochs=epochs, sweep=args.sweep,
                             sweep_fractions=tuple(float(f) for f in args.fractions.split(",")))
    started = time.time()
    metrics = reproduce(config)
    for name, result in metrics["models"].items():
        lo, hi = result["ci95"]["top1"]
        print(f"{name:>8}: top-1 {100 * result['top1']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]  top-3 "
              f"{100 * result['top3']:.1f}%")
    print(f"elapsed {time.time() - started:.0f} s; report: {Path(args.out) / 'report.md'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .data.split import load_prepared
    from .io import write_json_atomic
    from .pipeline import ReproduceConfig, sweep

    config = ReproduceConfig(data=args.data, out=args.out, model=args.model, seed=args.seed,
                             objectives=tuple(args.objectives.split(",")), train=_train_config(args),
                             sweep_fractions=tuple(float(f) for f in args.fractions.split(",")))
    points = sweep(load_prepared(args.data), Path(args.out), config)
    write_json_atomic(Path(args.out) / "sweep.json", points)
    for objective, rows in points.items():
        for point in rows:
            lo, hi = point["ci95"]
            print(f"{objective:>9} {point['fraction']:>5g} n={point['n_train']:>5}: top-1 {100 * point['top1']:.1f}% "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    print(f"figure: {Path(args.out) / 'data_efficiency.png'}")


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_SPEC

    parser = argparse.ArgumentParser(prog="clipmed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="validate a dataset and write its split manifest (split.json)")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4096, help="labeled rows to sample (all when fewer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="turn skipped rows into errors")
    _add_data_options(p)
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("train", help="fine-tune a model on a prepared dataset")
    p.add_argument("--data", help="prepared folder")
    p.add_argument("--model", default=DEFAULT_SPEC, help="dual:..., hf:..., or a run folder")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    _add_train_options(p, objective=True)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="zero-shot classification metrics with bootstrap intervals")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a prepared folder, or any dataset with --split all")
    p.add_argument("--split", choices=["test", "val", "all"], default="test")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--template", default="A medical image of {label}")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    _add_data_options(p)
    p.set_defaults(func=cmd_evaluate, label_field=None)

    p = commands.add_parser("sweep", help="data efficiency: zero-shot top-1 against growing shares of train data")
    p.add_argument("--data", required=True, help="prepared folder")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=DEFAULT_SPEC)
    p.add_argument("--fractions", default="0.1,0.25,0.5,1")
    p.add_argument("--objectives", default="caption,label,semantic")
    _add_train_options(p, objective=False)
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("entities", help="concept coverage of a dataset's captions (knowledge extraction)")
    p.add_argument("data")
    p.add_argument("--vocabulary", help="a concepts YAML replacing the packaged vocabulary")
    p.add_argument("--json", action="store_true")
    _add_data_options(p)
    p.set_defaults(func=cmd_entities)

    p = commands.add_parser("reproduce", help="the paper's experiment end to end, with a report")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=DEFAULT_SPEC)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--objectives", default="caption,label,semantic", help="fine-tuned models to compare with the base")
    p.add_argument("--caption-epochs", type=int)
    p.add_argument("--label-epochs", type=int)
    p.add_argument("--semantic-epochs", type=int)
    p.add_argument("--sweep", action="store_true", help="add the data-efficiency sweep (see `clipmed sweep`)")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1", help="train shares for --sweep")
    _add_data_options(p)
    _add_train_options(p, objective=False)
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the weight-loading reports are noise for a CLI user
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ClipmedError as exc:
        print(f"clipmed: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
