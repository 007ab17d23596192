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

import numpy
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
from ..objectives import OBJECTIVES, ContrastiveLoss, LabelLoss, SemanticMatchingLoss
from ..precision import autocast
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import build_optimizer, warmup_cosine

METRICS_COLUMNS = ["step", "epoch", "loss", "lr", "logit_scale", "pairs_per_s", "elapsed_s"]


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


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def build_loss(config: TrainConfig) -> torch.nn.Module:
    if config.objective == "label":
        return LabelLoss(config.label_targets)
    if config.objective == "semantic":
        return SemanticMatchingLoss(config.semantic_temperature)
    return ContrastiveLoss()


def _encode(model: ClipModel, records: list[Record], texts: list[str], config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 embeddings of the records' images and of the texts (autocast inside)."""
    device = torch.device(config.device)
    pixels = model.normalize_pixels(stack_images(records, model.preprocess.size, model.preprocess.interpolation).to(device))
    tokens = {key: value.to(device) for key, value in model.tokenize(texts).items()}
    with autocast(config.precision, device):
        image, text = model.encode_image(pixels), model.encode_text(tokens)
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def training_step(model: ClipModel, loss_fn: torch.nn.Module, rows: TrainingRows, index: torch.Tensor,
                  config: TrainConfig) -> torch.Tensor:
    """The loss of one batch (rows `index`), ready for backward()."""
    rows_in_batch = index.tolist()
    if config.objective == "label":
        # A batch holds few distinct prompts: encode each once (the loss indexes them per image).
        distinct, prompt_index = rows.labels[index].unique(return_inverse=True)
        prompts = [config.label_template.format(label=rows.classes[c]) for c in distinct.tolist()]
        image, text = _encode(model, [rows.records[i] for i in rows_in_batch], prompts, config)
        return loss_fn(image, text, model.scale(), prompt_index.to(image.device))
    if config.objective == "semantic":
        # Decoupled batch: the images of pair and image-only rows against the texts of pair and text-only rows.
        with_image = [i for i in rows_in_batch if rows.has_image[i]]
        with_text = [i for i in rows_in_batch if rows.texts[i] is not None]
        column = {row: position for position, row in enumerate(with_text)}
        pair_index = torch.tensor([column.get(i, -1) for i in with_image])
        image, text = _encode(model, [rows.records[i] for i in with_image], [rows.texts[i] for i in with_text], config)
        return loss_fn(image, text, model.scale(), rows.concepts[with_image].to(image.device),
                       rows.concepts[with_text].to(image.device), pair_index.to(image.device))
    image, text = _encode(model, [rows.records[i] for i in rows_in_batch], [rows.texts[i] for i in rows_in_batch], config)
    return loss_fn(image, text, model.scale())


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
    retrieval = retrieval_metrics((images @ texts.t()).numpy(), ks=(1,), n_boot=1)
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
    IMAGE_CACHE.warm([r.image_path for r, ok in zip(rows.records, rows.has_image) if ok] +
                     [r.image_path for r in prepared.records("val")], model.preprocess.size,
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
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.objective}", disable=None if progress else True)
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        order = epoch_order(len(rows.records), config.seed, epoch)
        locked = tuple(name for name, lock in (("image", config.lock_image), ("text", config.lock_text)) if lock)
        model.set_train_mode(freeze_batchnorm=config.freeze_batchnorm, locked=locked)
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
        "truncated_texts": model.count_truncated([t for t in rows.texts if t is not None]),
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
