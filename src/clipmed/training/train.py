"""The training loop, top to bottom: data -> model -> objective -> steps -> validation -> checkpoints.

A run folder holds: model/ (the best checkpoint by validation, in the model family's own format), run.json
(resolved config, versions, seed, split manifest path, learning rates, best score), checkpoints/last.pt
(everything needed to resume exactly) and metrics.csv (one row per step).
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import readable_records
from ..data.records import Record
from ..data.split import PreparedData, load_prepared
from ..devices import check_device
from ..errors import ClipmedError
from ..evaluation.benchmark import (BenchmarkConfig, DatasetData, evaluate_model, headline, load_suite, read_suite,
                                    summarize)
from ..evaluation.embed import embed_images, embed_texts
from ..evaluation.metrics import retrieval_metrics
from ..evaluation.zeroshot import class_embeddings, zero_shot_scores
from ..io import read_json, write_json_atomic
from ..machine import Choices, apply_threads, facts, resolve
from ..models import ClipModel, load_model
from ..objectives import OBJECTIVES, ContrastiveLoss, LabelLoss, SemanticMatchingLoss
from .checkpoint import clean_stale_temporaries, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import World, init_world
from .features import LockedFeatures
from .logging import RunLogger
from .optim import build_optimizer, load_optimizer_state, warmup_cosine
from .step import StepRunner, make_batch



@dataclass
class TrainingRows:
    """What one objective trains on, row by row.

    texts: the text of each row (caption or label prompt), None for an image-only row; has_image: False for a
    text-only row (its image was rejected by prepare); labels: class indices (label objective); concepts:
    concept vectors (semantic objective).
    """

    records: list[Record]
    texts: list[str | None]
    has_image: list[bool]
    classes: list[str]
    labels: torch.Tensor | None = None
    concepts: torch.Tensor | None = None

    def subset(self, keep: list[int]) -> "TrainingRows":
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return TrainingRows(pick(self.records), pick(self.texts), pick(self.has_image), self.classes,
                            self.labels[keep] if self.labels is not None else None,
                            self.concepts[keep] if self.concepts is not None else None)


def training_rows(prepared: PreparedData, config: TrainConfig) -> TrainingRows:
    """Caption-style objectives train on the caption pool; the label objective on the balanced train split;
    the semantic objective on the pool plus text-only and image-only rows (MedCLIP's decoupled batches)."""
    if config.objective == "label":
        records = prepared.records("train")
        rows = TrainingRows(records, [config.label_template.format(label=r.label) for r in records],
                            [True] * len(records), prepared.classes,
                            labels=torch.tensor([prepared.classes.index(r.label) for r in records]))
    elif config.objective == "caption":
        records = prepared.records("pool")
        rows = TrainingRows(records, [r.caption for r in records], [True] * len(records), prepared.classes)
    elif config.objective == "semantic":
        rows = _semantic_rows(prepared, config)
    else:
        raise ClipmedError(f"unknown objective {config.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if config.fraction < 1.0:
        # A fixed, seed-determined subset so that growing fractions nest (data-efficiency sweeps).
        order = torch.randperm(len(rows.records), generator=torch.Generator().manual_seed(config.seed))
        rows = rows.subset(sorted(order[: max(config.batch_size, round(len(rows.records) * config.fraction))].tolist()))
    return rows


def _semantic_rows(prepared: PreparedData, config: TrainConfig) -> TrainingRows:
    from ..knowledge import ConceptExtractor, Vocabulary

    pairs, text_only, image_only = prepared.records("pool"), prepared.text_only_records(), prepared.image_only_records()
    records = pairs + text_only + image_only
    vocabulary = Vocabulary.load(config.vocabulary) if config.vocabulary else Vocabulary.default()
    extractor = ConceptExtractor(vocabulary)
    concepts = extractor.entity_matrix([r.caption for r in pairs + text_only], [r.label for r in pairs + text_only],
                                       source=config.entities_from)
    # An image-only row has no caption: its concepts come from its label, whatever --entities-from says.
    label_concepts = extractor.entity_matrix([None] * len(image_only), [r.label for r in image_only], source="labels")
    return TrainingRows(records, [r.caption for r in pairs + text_only] + [None] * len(image_only),
                        [True] * len(pairs) + [False] * len(text_only) + [True] * len(image_only), prepared.classes,
                        concepts=torch.from_numpy(numpy.concatenate([concepts, label_concepts])))


# Bootstrap resamples of the suite scored at each validation (the log holds point estimates).
SUITE_N_BOOT = 200


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def build_loss(config: TrainConfig) -> torch.nn.Module:
    if config.objective == "label":
        return LabelLoss(config.label_targets)
    if config.objective == "semantic":
        return SemanticMatchingLoss(config.semantic_temperature)
    return ContrastiveLoss()


def validation_score(model: ClipModel, val: list[Record], classes: list[str], config: TrainConfig,
                     choices: Choices) -> tuple[str, float]:
    """Checkpoint selection without labels for label-free objectives (caption retrieval on val);
    zero-shot top-1 on val for the label objective. Each tower runs in the precision it trains in."""
    images = embed_images(model, val, batch_size=config.eval_batch_size, precision=choices.image_precision)
    if config.objective == "label":
        weights = class_embeddings(model, classes, [config.label_template], precision=choices.text_precision)
        predictions = zero_shot_scores(images, weights).argmax(dim=1)
        truth = torch.tensor([classes.index(r.label) for r in val])
        return "val_zero_shot_top1", float((predictions == truth).float().mean())
    texts = embed_texts(model, [r.caption for r in val], precision=choices.text_precision)
    retrieval = retrieval_metrics(images.numpy(), texts.numpy(), ks=(1,), n_boot=1)
    return "val_mean_recall_at_1", float(retrieval["mean_recall_at_1"])


def suite_validation(model: ClipModel, suite: list[DatasetData], run: Path, step: int,
                     config: TrainConfig) -> dict[str, float]:
    """Score the benchmark suite now: the full results go to RUN/suite/step-<step>.json, and the returned
    {name: value} to the validation log: `suite_<dataset>` (its headline), `suite_multiclass_top1` and
    `suite_multilabel_auroc` (the averages), and `suite_average` (the multiclass average, else the multilabel
    one) that `select_by_suite` selects by. Intervals use fewer resamples than `clipmed benchmark` (cheap at
    every validation); nothing is cached, the weights change every time."""
    bench = BenchmarkConfig(n_boot=SUITE_N_BOOT, seed=config.seed, precision=config.precision,
                            batch_size=config.eval_batch_size, cache=False)
    evaluation = evaluate_model(model, suite, bench)
    average = summarize({"model": evaluation}, suite)["average"]["model"]
    write_json_atomic(run / "suite" / f"step-{step}.json", {"step": step, "results": evaluation.results,
                                                             "average": average})
    values = {f"suite_{name}": headline(result)[0] for name, result in evaluation.results.items()}
    values.update({f"suite_{key}": entry["value"] for key, entry in average.items() if entry is not None})
    chosen = average["multiclass_top1"] or average["multilabel_auroc"]
    if chosen is not None:
        values["suite_average"] = chosen["value"]
    return {name: value for name, value in values.items() if value is not None}


def save_model_atomically(model: ClipModel, run: Path) -> None:
    """Write model/ beside the old one, then swap: a crash leaves one complete model folder."""
    staging, old = run / ".model.tmp", run / ".model.old"
    for stale in (staging, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.save(staging)
    if (run / "model").exists():
        (run / "model").rename(old)
    staging.rename(run / "model")
    shutil.rmtree(old, ignore_errors=True)


def _drop_unreadable(rows: TrainingRows, val: list[Record], model: ClipModel,
                     progress: bool) -> tuple[TrainingRows, list[Record], dict[str, str]]:
    """Decode every image once (the cache serves all epochs) and skip rows whose image stopped being readable
    after prepare: one changed file must not crash a long run. Returns the kept rows, val and {id: reason}."""
    size, interpolation = model.preprocess.size, model.preprocess.interpolation
    bar = (lambda it: tqdm(it, desc="decode images", leave=False)) if progress else None
    with_image = [i for i, ok in enumerate(rows.has_image) if ok]
    readable, unreadable = readable_records([rows.records[i] for i in with_image], size, interpolation, progress=bar)
    dropped = set(with_image) - {with_image[i] for i in readable}
    val_readable, val_unreadable = readable_records(val, size, interpolation, progress=bar)
    if unreadable or val_unreadable:
        tqdm.write(f"skipping {len(unreadable) + len(val_unreadable)} rows whose image can no longer be read "
                   f"(listed in run.json)")
    rows = rows.subset([i for i in range(len(rows.records)) if i not in dropped])
    return rows, [val[i] for i in val_readable], {**unreadable, **val_unreadable}


def environment() -> dict:
    import transformers

    return {"clipmed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads()}


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train one run; with resume=True continue RUN from its last checkpoint, bitwise as if never stopped.

    Under torchrun every rank runs this function; rank 0 alone writes the run folder.
    """
    run = Path(config.out)
    checkpoints = run / "checkpoints"
    if resume:
        if not (run / "run.json").is_file():
            raise ClipmedError(f"{run} holds no run to resume (no run.json: it was never started, or is not a run "
                               "folder); start it with --data and --out instead")
        saved = read_json(run / "run.json")
        config = TrainConfig.from_dict({**saved["config"], "out": str(run)})
    device = check_device(config.device)  # before any model loads
    world = init_world(config.device)
    if not resume and (run / "run.json").exists():
        raise ClipmedError(f"{run} already holds a run: pass --resume to continue it or choose another --out")
    if resume and world.is_main:
        clean_stale_temporaries(run, names=None)  # temporaries of run.json and the logs, left by a kill
    world.barrier()  # every rank checked before rank 0 writes run.json
    if world.distributed and config.accum_steps > 1:
        raise ClipmedError("--accum-steps with several processes is not supported: use one or the other")
    if config.select_by_suite and not config.suite:
        raise ClipmedError("--select-by-suite needs --suite SUITE.yaml")
    if config.local_loss and config.objective != "caption":
        raise ClipmedError(f"--local-loss applies to the caption objective (CLIP's loss), not {config.objective!r}: "
                           "drop --local-loss")
    if world.distributed and config.batch_size % world.size:
        raise ClipmedError(f"--batch-size {config.batch_size} must be a multiple of the {world.size} processes")
    torch.manual_seed(config.seed)
    progress = progress and world.is_main

    prepared = load_prepared(config.data)
    rows = training_rows(prepared, config)
    if len(rows.records) < max(2, config.batch_size):
        raise ClipmedError(f"only {len(rows.records)} training rows for objective {config.objective!r} "
                           f"(batch size {config.batch_size}): lower --batch-size or prepare more data")
    model = load_model(config.model).to(device)
    # Speed choices: decided for this machine and model once, then reused by every resume of the run.
    recorded = saved.get("machine") if resume else None
    machine = facts(device)
    choices, decided_by = resolve(config.speed(), machine, image_tower=model.image_tower_kind,
                                  recorded=recorded["choices"] if recorded else None)
    machine_record = recorded or {"choices": choices.to_dict(), "decided_by": decided_by, "facts": machine.to_dict(),
                                  "image_tower": model.image_tower_kind}
    apply_threads(choices)
    if world.distributed and not config.freeze_batchnorm:
        # Per-process batch statistics would make ranks diverge: synchronise them (GPU only in torch).
        if device.type != "cuda":
            raise ClipmedError("--update-batchnorm with several CPU processes needs SyncBatchNorm, which torch runs on "
                               "GPUs only: keep BatchNorm statistics frozen (the default) or train on GPUs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    rows, val, unreadable = _drop_unreadable(rows, prepared.records("val"), model, progress)
    suite = read_suite(load_suite(config.suite)) if config.suite and world.is_main else None
    optimizer, groups = build_optimizer(model, config)  # also freezes locked towers (requires_grad False)
    runner = _step_runner(model, config, world, rows, prepared, choices)
    steps_per_epoch = len(rows.records) // config.batch_size  # drop_last: a tiny final batch has no negatives
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = warmup_cosine(optimizer, total_steps, round(config.warmup_fraction * total_steps))

    step, best, best_epoch, score_name = 0, float("-inf"), -1, ""
    state = load_checkpoint(checkpoints) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, best, best_epoch, score_name = state["step"], state["best"], state["best_epoch"], state["score_name"]
    if world.is_main:
        _write_run_json(run, config, prepared, model, groups, rows, world, status="running",
                        extra={"unreadable_images": unreadable, "machine": machine_record})
    # Rank 0 alone logs; a resumed run drops what the interrupted one logged after its checkpoint.
    logger = (RunLogger(run, start_step=step, report_to=config.report_to, config=asdict(config))
              if world.is_main else None)

    def checkpoint() -> None:
        if world.is_main:
            # The logs first: a kill between the two writes leaves rows after the checkpoint (dropped on
            # resume), never a checkpoint after rows that were not written.
            logger.flush()
            save_checkpoint(checkpoints, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                                          "step": step, "best": best, "best_epoch": best_epoch,
                                          "score_name": score_name})
        world.barrier()

    started = time.time()
    locked = tuple(name for name, lock in (("image", config.lock_image), ("text", config.lock_text)) if lock)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.objective}", disable=None if progress else True)
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        order = epoch_order(len(rows.records), config.seed, epoch)
        model.set_train_mode(freeze_batchnorm=config.freeze_batchnorm, locked=locked)
        for batch in range(first_batch, steps_per_epoch):
            tick = time.time()
            optimizer.zero_grad(set_to_none=True)
            loss = runner(make_batch(rows, order[batch * config.batch_size:(batch + 1) * config.batch_size], config))
            optimizer.step()
            scheduler.step()
            step += 1
            rate = config.batch_size / (time.time() - tick)
            lr = max(group["lr"] for group in optimizer.param_groups)
            if logger is not None:
                logger.step(step, epoch, loss, lr, model.logit_scale.item(), rate, time.time() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", pairs_s=f"{rate:.1f}")
            if step == total_steps:
                break
            if step % config.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                checkpoint()
        # End of an epoch (or of max_steps): select by validation, then checkpoint.
        if world.is_main:
            score_name, score = validation_score(model, val, prepared.classes, config, choices)
            logger.validation(step, score_name, score)
            if suite is not None:
                for name, value in suite_validation(model, suite, run, step, config).items():
                    logger.validation(step, name, value)
                    if config.select_by_suite and name == "suite_average":
                        score_name, score = name, value
            if score > best:
                best, best_epoch = score, epoch
                save_model_atomically(model, run)
            bar.write(f"epoch {epoch}: {score_name} = {score:.4f} (best {best:.4f} at epoch {best_epoch})")
        checkpoint()
    bar.close()
    if world.is_main:
        logger.close()
        _write_run_json(run, config, prepared, model, groups, rows, world, status="done",
                        extra={"best": {score_name: best, "epoch": best_epoch}, "steps": step,
                               "seconds": round(time.time() - started, 1), "unreadable_images": unreadable,
                               "machine": machine_record})
    return run


def _step_runner(model: ClipModel, config: TrainConfig, world: World, rows: TrainingRows,
                 prepared: PreparedData, choices: Choices) -> StepRunner:
    """Speed and memory options, then the runner: locked towers' features come from a disk cache (LiT), the
    trainable towers are optionally compiled and gradient-checkpointed."""
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    fingerprint = prepared.manifest["source"]["fingerprint"]
    locked_images = locked_texts = None
    if config.lock_image and config.feature_cache:
        locked_images = LockedFeatures.build(model, "image", [r for r, ok in zip(rows.records, rows.has_image) if ok],
                                             precision=choices.image_precision, data_fingerprint=fingerprint)
    if config.lock_text and config.feature_cache:
        texts = ([config.label_template.format(label=c) for c in rows.classes] if config.objective == "label"
                 else [t for t in rows.texts if t is not None])
        locked_texts = LockedFeatures.build(model, "text", texts, precision=choices.text_precision,
                                            data_fingerprint=fingerprint)
    if choices.compile:
        model.compile_towers(tuple(name for name, lock in (("image", config.lock_image), ("text", config.lock_text))
                                   if not lock))
    return StepRunner(model, build_loss(config), config, world, locked_images, locked_texts, choices)


def _write_run_json(run: Path, config: TrainConfig, prepared: PreparedData, model: ClipModel, groups: list[dict],
                    rows: TrainingRows, world: World, *, status: str, extra: dict) -> None:
    write_json_atomic(run / "run.json", {
        "status": status,
        "config": asdict(config),
        "learning_rates": {"clip": config.resolved_lr_clip(), "pretrained": config.lr_pretrained, "new": config.lr_new},
        "seed": config.seed,
        "split": str(Path(config.data).resolve() / "split.json"),
        "classes": prepared.classes,
        "model": model.describe(),
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.98], "eps": 1e-6, "groups": groups,
                      "schedule": "linear warmup then cosine to zero"},
        "batchnorm": "running statistics frozen (eval mode) while training" if config.freeze_batchnorm
                     else "running statistics updated while training",
        "n_training_rows": len(rows.records),
        "processes": world.size,
        "truncated_texts": model.count_truncated([t for t in rows.texts if t is not None]),
        "environment": environment(),
        **extra,
    })
