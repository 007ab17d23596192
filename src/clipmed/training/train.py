"""The training loop, top to bottom: data -> model -> objective -> steps -> validation -> checkpoints.

A run folder holds: model/ (the best checkpoint by validation, in the model family's own format), run.json
(resolved config, versions, seed, split manifest path, learning rates, best score), checkpoints/last.pt
(everything needed to resume exactly) and metrics.csv (one row per step).
"""

from __future__ import annotations

import csv
import io
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import IMAGE_CACHE, stack_images
from ..data.records import Record
from ..data.split import PreparedData, load_prepared
from ..errors import ClipmedError
from ..evaluation.embed import embed_images, embed_texts
from ..evaluation.metrics import retrieval_metrics
from ..evaluation.zeroshot import class_embeddings, zero_shot_scores
from ..io import read_json, write_json_atomic, write_text_atomic
from ..models import ClipModel, load_model
from ..objectives import ContrastiveLoss, LabelLoss
from ..precision import autocast
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import build_optimizer, warmup_cosine

METRICS_COLUMNS = ["step", "epoch", "loss", "lr", "logit_scale", "pairs_per_s", "elapsed_s"]


@dataclass
class TrainingRows:
    """What one objective trains on: records, the text paired with each, and class indices (label objective)."""

    records: list[Record]
    texts: list[str]
    labels: torch.Tensor | None
    classes: list[str]


def training_rows(prepared: PreparedData, config: TrainConfig) -> TrainingRows:
    """Caption-style objectives train on the caption pool; the label objective on the balanced train split."""
    if config.objective == "label":
        records = prepared.records("train")
        labels = torch.tensor([prepared.classes.index(r.label) for r in records])
        texts = [config.label_template.format(label=r.label) for r in records]
    elif config.objective == "caption":
        records = prepared.records("pool")
        labels, texts = None, [r.caption for r in records]
    else:
        raise ClipmedError(f"unknown objective {config.objective!r}: use caption or label")
    if config.fraction < 1.0:
        # A fixed, seed-determined subset so that growing fractions nest (data-efficiency sweeps).
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed))
        keep = sorted(order[: max(config.batch_size, round(len(records) * config.fraction))].tolist())
        records, texts = [records[i] for i in keep], [texts[i] for i in keep]
        labels = labels[keep] if labels is not None else None
    return TrainingRows(records, texts, labels, prepared.classes)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def build_loss(config: TrainConfig) -> torch.nn.Module:
    if config.objective == "label":
        return LabelLoss(config.label_targets)
    return ContrastiveLoss()


def training_step(model: ClipModel, loss_fn: torch.nn.Module, rows: TrainingRows, index: torch.Tensor,
                  config: TrainConfig) -> torch.Tensor:
    device = torch.device(config.device)
    records = [rows.records[i] for i in index.tolist()]
    pixels = model.normalize_pixels(stack_images(records, model.preprocess.size, model.preprocess.interpolation).to(device))
    with autocast(config.precision, device):
        image = model.encode_image(pixels)
        if rows.labels is not None:
            # A batch holds few distinct prompts: encode each once (the loss indexes them per image).
            labels = rows.labels[index].to(device)
            distinct, prompt_index = labels.unique(return_inverse=True)
            prompts = [config.label_template.format(label=rows.classes[c]) for c in distinct.tolist()]
            text = model.encode_text(_to(model.tokenize(prompts), device))
        else:
            text = model.encode_text(_to(model.tokenize([rows.texts[i] for i in index.tolist()]), device))
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    if rows.labels is not None:
        return loss_fn(image, text, model.scale(), prompt_index)
    return loss_fn(image, text, model.scale())


def _to(tokens: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in tokens.items()}


def validation_score(model: ClipModel, prepared: PreparedData, config: TrainConfig) -> tuple[str, float]:
    """Checkpoint selection without labels for label-free objectives (caption retrieval on val);
    zero-shot top-1 on val for the label objective."""
    val = prepared.records("val")
    images = embed_images(model, val, batch_size=config.eval_batch_size, precision=config.precision)
    if config.objective == "label":
        weights = class_embeddings(model, prepared.classes, [config.label_template], precision=config.precision)
        predictions = zero_shot_scores(images, weights).argmax(dim=1)
        truth = torch.tensor([prepared.classes.index(r.label) for r in val])
        return "val_zero_shot_top1", float((predictions == truth).float().mean())
    texts = embed_texts(model, [r.caption for r in val], precision=config.precision)
    retrieval = retrieval_metrics((images @ texts.t()).numpy(), ks=(1,), n_boot=0)
    return "val_mean_recall_at_1", float(retrieval["mean_recall_at_1"])


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


def environment() -> dict:
    import transformers

    return {"clipmed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads()}


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train one run; with resume=True continue RUN from its last checkpoint, bitwise as if never stopped."""
    run = Path(config.out)
    checkpoints = run / "checkpoints"
    if resume:
        saved = read_json(run / "run.json")
        config = TrainConfig.from_dict({**saved["config"], "out": str(run)})
    elif (run / "run.json").exists():
        raise ClipmedError(f"{run} already holds a run: pass --resume to continue it or choose another --out")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)

    prepared = load_prepared(config.data)
    rows = training_rows(prepared, config)
    if len(rows.records) < max(2, config.batch_size):
        raise ClipmedError(f"only {len(rows.records)} training rows for objective {config.objective!r} "
                           f"(batch size {config.batch_size}): lower --batch-size or prepare more data")
    model = load_model(config.model).to(device)
    IMAGE_CACHE.warm([r.image_path for r in rows.records + prepared.records("val")], model.preprocess.size,
                     model.preprocess.interpolation,
                     progress=(lambda it: tqdm(it, desc="decode images", leave=False)) if progress else None)
    optimizer, groups = build_optimizer(model, config)
    steps_per_epoch = len(rows.records) // config.batch_size  # drop_last: a tiny final batch has no negatives
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = warmup_cosine(optimizer, total_steps, round(config.warmup_fraction * total_steps))
    loss_fn = build_loss(config)

    step, best, best_epoch, score_name = 0, float("-inf"), -1, ""
    state = load_checkpoint(checkpoints) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, best, best_epoch, score_name = state["step"], state["best"], state["best_epoch"], state["score_name"]
    _write_run_json(run, config, prepared, model, groups, rows, status="running", extra={})
    csv_rows = _metrics_rows(run, keep_until=step)

    def checkpoint() -> None:
        save_checkpoint(checkpoints, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                                      "step": step, "best": best, "best_epoch": best_epoch, "score_name": score_name})
        _write_metrics(run, csv_rows)

    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.objective}", disable=not progress)
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        order = epoch_order(len(rows.records), config.seed, epoch)
        model.set_train_mode(freeze_batchnorm=config.freeze_batchnorm)
        for batch in range(first_batch, steps_per_epoch):
            tick = time.time()
            loss = training_step(model, loss_fn, rows, order[batch * config.batch_size:(batch + 1) * config.batch_size], config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            rate = config.batch_size / (time.time() - tick)
            lr = optimizer.param_groups[-1]["lr"]
            csv_rows.append([step, epoch, f"{loss.item():.6f}", f"{lr:.3e}", f"{model.logit_scale.item():.5f}",
                             f"{rate:.2f}", f"{time.time() - started:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", pairs_s=f"{rate:.1f}")
            if step == total_steps:
                break
            if step % config.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                checkpoint()
        # End of an epoch (or of max_steps): select by validation, then checkpoint.
        score_name, score = validation_score(model, prepared, config)
        if score > best:
            best, best_epoch = score, epoch
            save_model_atomically(model, run)
        bar.write(f"epoch {epoch}: {score_name} = {score:.4f} (best {best:.4f} at epoch {best_epoch})")
        checkpoint()
    bar.close()
    _write_run_json(run, config, prepared, model, groups, rows, status="done",
                    extra={"best": {score_name: best, "epoch": best_epoch}, "steps": step})
    return run


def _write_run_json(run: Path, config: TrainConfig, prepared: PreparedData, model: ClipModel, groups: list[dict],
                    rows: TrainingRows, *, status: str, extra: dict) -> None:
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
        "truncated_texts": model.count_truncated(rows.texts),
        "environment": environment(),
        **extra,
    })


def _metrics_rows(run: Path, keep_until: int) -> list[list]:
    """Rows of metrics.csv up to `keep_until` steps (a resumed run rewrites what came after its checkpoint)."""
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return [row for row in reader if int(row[0]) <= keep_until]


def _write_metrics(run: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(run / "metrics.csv", buffer.getvalue())
