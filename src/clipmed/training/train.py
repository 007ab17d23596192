"""The training loop, top to bottom: data -> model -> objective -> steps -> validation -> checkpoints.

A run folder holds: model/ (the best checkpoint by validation, in the model family's own format), run.json
(resolved config, versions, seed, split manifest path, learning rates, best score), checkpoints/last.pt
(everything needed to resume exactly) and metrics.csv (one row per step).
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import EpochBatches, StoreImages, epoch_order, loader
from ..data.records import Record
from ..data.store import ImageStore, open_store
from ..data.split import PreparedData, load_prepared
from ..devices import check_device
from ..errors import ClipmedError
from ..evaluation.benchmark import (BenchmarkConfig, DatasetData, evaluate_model, headline, load_suite, read_suite,
                                    summarize)
from ..io import read_json, write_json_atomic
from ..locking import FileLock
from ..machine import Choices, apply_threads, apply_to_model, facts, resolve
from ..models import ClipModel, load_model
from ..models.lora import add_lora, merged
from ..objectives import OBJECTIVES, TrainingRows, get_objective
from ..processes import keep_freed_memory, start_loader_server
from .checkpoint import clean_stale_temporaries, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import World, init_world
from .features import LockedFeatures
from .logging import RunLogger
from .memory import PeakMemory
from .optim import build_optimizer, load_optimizer_state, warmup_cosine
from .step import StepRunner
from .validation import validation_scores


def training_rows(prepared: PreparedData, config: TrainConfig) -> TrainingRows:
    """The rows the objective trains on (all of them, or a seed-determined share: `config.fraction`)."""
    rows = get_objective(config.objective).rows(prepared, config)
    if config.fraction < 1.0:
        # A fixed, seed-determined subset so that growing fractions nest (data-efficiency sweeps).
        order = torch.randperm(len(rows.records), generator=torch.Generator().manual_seed(config.seed))
        rows = rows.subset(sorted(order[: max(config.batch_size, round(len(rows.records) * config.fraction))].tolist()))
    return rows


# Bootstrap resamples of the suite scored at each validation (the log holds point estimates).
SUITE_N_BOOT = 200


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
    """Write model/ beside the old one, then swap: a crash leaves one complete model folder. LoRA adapters are
    merged into the saved weights, so model/ is a plain model of its family."""
    staging, old = run / ".model.tmp", run / ".model.old"
    for stale in (staging, old):
        shutil.rmtree(stale, ignore_errors=True)
    merged(model).save(staging)
    if (run / "model").exists():
        (run / "model").rename(old)
    staging.rename(run / "model")
    shutil.rmtree(old, ignore_errors=True)


def _open_images(rows: TrainingRows, val: Sequence[Record], model: ClipModel, config: TrainConfig, world: World,
                 progress: bool) -> tuple[TrainingRows, list[Record], dict[str, str], ImageStore, numpy.ndarray]:
    """The image store of the training and validation images (rank 0 builds what it lacks, the others wait), the
    rows without those whose image stopped being readable after prepare (one changed file must not crash a long
    run), val likewise (its fixed seeded subset with --val-max-rows), {id: reason} of the skipped, and the store
    row of each kept training row (-1: a text-only row)."""
    with_image = numpy.flatnonzero(numpy.array(rows.has_image, dtype=bool))
    image_paths = rows.records.column("image_path").take(with_image)
    val_paths = [r.image_path for r in val]
    size, interpolation = model.preprocess.size, model.preprocess.interpolation
    if world.is_main:
        open_store([*image_paths, *val_paths], size, interpolation, config.store_options(), progress=progress)
    world.barrier()
    store = open_store([*image_paths, *val_paths], size, interpolation, config.store_options())
    image_rows, failures = store.lookup(image_paths)
    val_rows, val_failures = store.lookup(val_paths)
    unreadable = dict(zip(rows.records.column("id").take(with_image[image_rows < 0]),
                          (failures[p] for p in image_paths.take(numpy.flatnonzero(image_rows < 0))), strict=True))
    unreadable.update({val[i].id: val_failures[val[i].image_path] for i in numpy.flatnonzero(val_rows < 0)})
    if unreadable:
        tqdm.write(f"skipping {len(unreadable)} rows whose image can no longer be read (listed in run.json)")
    store_rows = numpy.full(len(rows.records), -1, dtype=numpy.int64)
    store_rows[with_image] = image_rows
    if (image_rows < 0).any():
        keep = numpy.flatnonzero((store_rows >= 0) | ~numpy.array(rows.has_image, dtype=bool))
        rows, store_rows = rows.subset(keep.tolist()), store_rows[keep]
    val = [r for r, row in zip(val, val_rows.tolist()) if row >= 0]
    if config.val_max_rows is not None and len(val) > config.val_max_rows:
        pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(config.seed))[:config.val_max_rows]
        val = [val[i] for i in sorted(pick.tolist())]
    return rows, val, unreadable, store, store_rows


def _image_batches(store: ImageStore, store_rows: numpy.ndarray, config: TrainConfig, world: World, *,
                   steps_per_epoch: int, start: int, stop: int) -> Iterator[torch.Tensor]:
    """This rank's share of the image rows of each step from `start` to `stop`, read from the store in
    epoch_order by the loader's worker processes (augmented per (seed, epoch, row) with --augment)."""
    batches = EpochBatches(store_rows, store_rows >= 0, seed=config.seed, batch_size=config.batch_size,
                           steps_per_epoch=steps_per_epoch, start=start, stop=stop, shard=world.shard_rows)
    return iter(loader(StoreImages(store, config.augmentation(), seed=config.seed), batches,
                       workers=config.loader_workers, device=config.device))


def environment() -> dict:
    import transformers

    return {"clipmed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads()}


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train one run; with resume=True continue RUN from its last checkpoint, bitwise as if never stopped.

    Under torchrun every rank runs this function; rank 0 alone writes the run folder, and holds its lock for the
    whole run (a second `clipmed train` into it is refused, naming the holder).
    """
    run = Path(config.out)
    if resume:
        if not (run / "run.json").is_file():
            raise ClipmedError(f"{run} holds no run to resume (no run.json: it was never started, or is not a run "
                               "folder); start it with --data and --out instead")
        saved = read_json(run / "run.json")
        config = TrainConfig.from_dict({**saved["config"], "out": str(run)})
    keep_freed_memory()  # steps reuse their pages (the CLI does this too; here for scripts that call train)
    device = check_device(config.device)  # before any model loads
    world = init_world(config.device)
    with FileLock(run, what="clipmed train") if world.is_main else nullcontext(), PeakMemory(device) as memory:
        return _train(config, run, world, device, saved if resume else None, memory, progress=progress)


def _train(config: TrainConfig, run: Path, world: World, device: torch.device, saved: dict | None,
           memory: PeakMemory, *, progress: bool) -> Path:
    """The run itself, under the run folder's lock; `saved` is run.json of the run being resumed (None: a new run);
    `memory` samples the peak memory that run.json reports."""
    resume = saved is not None
    checkpoints = run / "checkpoints"
    if not resume and (run / "run.json").exists():
        raise ClipmedError(f"{run} already holds a run: pass --resume to continue it or choose another --out")
    if resume and world.is_main:
        clean_stale_temporaries(run, names=None)  # temporaries of run.json and the logs, left by a kill
    world.barrier()  # every rank checked before rank 0 writes run.json
    if world.distributed and config.accum_steps > 1:
        raise ClipmedError("--accum-steps with several processes is not supported: use one or the other")
    if config.select_by_suite and not config.suite:
        raise ClipmedError("--select-by-suite needs --suite SUITE.yaml")
    objective = get_objective(config.objective)
    if config.local_loss and not objective.local_loss:
        local = ", ".join(name for name, o in OBJECTIVES.items() if o.local_loss)
        raise ClipmedError(f"--local-loss applies to the {local} objective (CLIP's loss), not {config.objective!r}: "
                           "drop --local-loss")
    if world.distributed and config.batch_size % world.size:
        raise ClipmedError(f"--batch-size {config.batch_size} must be a multiple of the {world.size} processes")
    torch.manual_seed(config.seed)
    progress = progress and world.is_main
    if config.loader_workers != 0:
        start_loader_server()  # its imports overlap the loading below

    prepared = load_prepared(config.data)
    rows = training_rows(prepared, config)
    if len(rows.records) < max(2, config.batch_size):
        raise ClipmedError(f"only {len(rows.records)} training rows for objective {config.objective!r} "
                           f"(batch size {config.batch_size}): lower --batch-size or prepare more data")
    model = load_model(config.init or config.model).to(device)
    objective.prepare_model(model, config)
    locked = tuple(name for name, lock in (("image", config.lock_image), ("text", config.lock_text)) if lock)
    lora = (add_lora(model, config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
                     towers=[name for name in model.towers() if name not in locked]) if config.lora_rank else None)
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
    rows, val, unreadable, store, store_rows = _open_images(rows, prepared.records("val"), model, config, world,
                                                            progress)
    suite = read_suite(load_suite(config.suite)) if config.suite and world.is_main else None
    optimizer, groups = build_optimizer(model, config)  # also freezes locked towers (requires_grad False)
    # LP-FT's first phase leaves these out (no gradient: AdamW skips them, weight decay included).
    tower_weights = [p for tower in model.towers().values() for p in tower.parameters() if p.requires_grad]
    runner = _step_runner(model, config, world, rows, prepared, choices)
    steps_per_epoch = len(rows.records) // config.batch_size  # drop_last: a tiny final batch has no negatives
    total_steps = steps_per_epoch * (config.lp_epochs + config.epochs)
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
    counts = {"trainable_parameters": sum(g["n_params"] for g in groups),
              "total_parameters": sum(p.numel() for p in model.parameters()), "lora_targets": lora}
    if world.is_main:
        _write_run_json(run, config, prepared, model, groups, rows, world, status="running",
                        extra={"unreadable_images": unreadable, "machine": machine_record, **counts})
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

    def validate(epoch: int) -> None:
        """Rank 0 scores val; model/ is saved whenever the score improves (the first validation always does)."""
        nonlocal best, best_epoch, score_name
        if world.is_main:
            ((score_name, score),) = validation_scores(
                model, val, prepared.classes, [objective.selection], template=config.label_template,
                image_precision=choices.image_precision, text_precision=choices.text_precision,
                batch_size=config.eval_batch_size, store=config.store_options(),
                loader_workers=config.loader_workers).items()
            logger.validation(step, score_name, score)
            if suite is not None:
                for name, value in suite_validation(model, suite, run, step, config).items():
                    logger.validation(step, name, value)
                    if config.select_by_suite and name == "suite_average":
                        score_name, score = name, value
            if score > best:
                best, best_epoch = score, epoch
                save_model_atomically(model, run)
            bar.write(f"step {step} (epoch {epoch}): {score_name} = {score:.4f} (best {best:.4f} at epoch {best_epoch})")
        world.barrier()

    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.objective}", disable=None if progress else True)
    # Locked image features stand in for pixels: then nothing is read from the store while training.
    images = (None if runner.locked_images is not None else
              _image_batches(store, store_rows, config, world, steps_per_epoch=steps_per_epoch, start=step,
                             stop=total_steps))
    waited_total = 0.0
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        order = epoch_order(len(rows.records), config.seed, epoch)
        probing = epoch < config.lp_epochs  # LP-FT: the linear probe phase trains the heads only
        for weight in tower_weights:
            weight.requires_grad_(not probing)
        model.set_train_mode(freeze_batchnorm=config.freeze_batchnorm,
                             locked=tuple(model.towers()) if probing else locked)
        for batch in range(first_batch, steps_per_epoch):
            tick = time.time()
            pixels = next(images) if images is not None else None
            waited = time.time() - tick
            optimizer.zero_grad(set_to_none=True)
            index = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            loss = runner(dataclasses.replace(objective.batch(rows, index, config), pixels=pixels))
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.time() - tick
            rate, waited_total = config.batch_size / seconds, waited_total + waited
            lr = max(group["lr"] for group in optimizer.param_groups)
            if logger is not None:
                logger.step(step, epoch, loss, lr, model.logit_scale.item(), rate, time.time() - started,
                            data_wait=waited)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", pairs_s=f"{rate:.1f}",
                            data_wait=f"{waited_total / max(time.time() - started, 1e-9):.0%}")
            if step == total_steps:
                break
            if config.val_every and step % config.val_every == 0 and batch + 1 < steps_per_epoch:
                validate(epoch)
                checkpoint()
            elif step % config.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                checkpoint()
        # End of an epoch (or of max_steps): select by validation, then checkpoint.
        validate(epoch)
        checkpoint()
    bar.close()
    if world.is_main:
        logger.close()
        # After the loop, not before the first step: it tokenizes every caption (a minute at a million rows).
        counts["truncated_texts"] = model.count_truncated([t for t in rows.texts if t is not None])
        _write_run_json(run, config, prepared, model, groups, rows, world, status="done",
                        extra={"best": {score_name: best, "epoch": best_epoch}, "steps": step,
                               "seconds": round(time.time() - started, 1), "unreadable_images": unreadable,
                               "machine": machine_record, **counts, **memory.figures()})
    return run


def _step_runner(model: ClipModel, config: TrainConfig, world: World, rows: TrainingRows,
                 prepared: PreparedData, choices: Choices) -> StepRunner:
    """Speed and memory options, then the runner: locked towers' features come from a disk cache (LiT), the
    trainable towers are optionally compiled and gradient-checkpointed."""
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    apply_to_model(model, choices)  # before the locked-tower cache, so that it computes what training would
    fingerprint = prepared.manifest["source"]["fingerprint"]

    def features(side: str, inputs: Sequence) -> LockedFeatures:
        """Rank 0 computes and caches the features, then every rank loads them (one computation per run)."""
        precision = choices.image_precision if side == "image" else choices.text_precision
        build = lambda: LockedFeatures.build(model, side, inputs, precision=precision,  # noqa: E731
                                             data_fingerprint=fingerprint, store=config.store_options(),
                                             loader_workers=config.loader_workers)
        built = build() if world.is_main else None
        world.barrier()
        return built if built is not None else build()

    locked_images = locked_texts = None
    if config.lock_image and config.feature_cache:
        locked_images = features("image", rows.records.take(numpy.flatnonzero(rows.has_image)))  # a view, no Records
    objective = get_objective(config.objective)
    if config.lock_text and config.feature_cache:
        locked_texts = features("text", objective.fixed_texts(rows, config))
    if choices.compile:
        model.compile_towers(tuple(name for name, lock in (("image", config.lock_image), ("text", config.lock_text))
                                   if not lock))
    return StepRunner(model, objective.loss(config, model), config, world, locked_images, locked_texts, choices)


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
        "environment": environment(),
        **extra,
    })
