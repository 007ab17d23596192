"""Training configuration as plain data; every run writes it, resolved, into run.json."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..data.datasets import Augment
from ..data.store import StoreOptions
from ..machine import Speed
from ..models import DEFAULT_SPEC

# CLIP ViT-B/32 pretraining: lr 5e-4 at batch 32,768. Fine-tuning a pretrained CLIP scales it by batch size
# (the paper's rule: "downscaled in proportion to how much smaller our batch size was").
CLIP_PRETRAIN_LR = 5e-4
CLIP_PRETRAIN_BATCH = 32768


@dataclass
class TrainConfig:
    data: str = ""                      # a prepared folder (split.json)
    out: str = ""                       # the run folder
    model: str = DEFAULT_SPEC
    objective: str = "caption"          # caption | label | semantic
    epochs: int = 3
    batch_size: int = 32
    lr_clip: float | None = None        # weights pretrained contrastively; None = CLIP's rate scaled by batch
    lr_pretrained: float = 1e-4         # towers pretrained alone (ImageNet CNN, MiniLM): chosen by experiment
    lr_new: float = 1e-3                # fresh projections and the temperature: chosen by experiment
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1        # linear warmup over this share of steps, then cosine to zero
    lock_image: bool = False
    lock_text: bool = False
    freeze_batchnorm: bool = True       # small batches: keep BatchNorm running statistics as pretrained
    label_template: str = "A medical image of {label}"
    label_targets: str = "multi"        # multi (same-label pairs are positives) | naive (the paper's)
    semantic_temperature: float = 0.1   # tau_t of the semantic matching targets
    entities_from: str = "captions"     # captions | labels | both (semantic objective)
    vocabulary: str | None = None       # a concepts YAML replacing the packaged one (semantic objective)
    # Speed choices (clipmed.machine decides each per machine; "auto" / None / 0 leave it to its rule table,
    # anything else forces it). A run records the resolved choices in run.json; a resumed run reuses them.
    precision: str = "auto"             # both towers' autocast: bf16 | fp32
    image_precision: str = "auto"       # the image tower's, over `precision`
    text_precision: str = "auto"        # the text tower's, over `precision`
    memory_format: str = "auto"         # image tower: channels_last | contiguous
    fuse_conv_bn: bool | None = None    # frozen BatchNorm folded into the convolution before it
    attention: str = "auto"             # matmul (plain matmul + softmax) | fused (torch's fused kernels)
    threads: int = 0                    # torch intra-op threads
    accum_steps: int = 1                # micro-batches per step; the loss still sees the whole batch (GradCache)
    grad_checkpointing: bool = False    # recompute tower activations in backward: less memory, more compute
    compile: bool | None = None         # torch.compile the trainable towers
    local_loss: bool = False            # several processes: each computes only its rows' terms (open_clip's)
    text_bucket: int = 8                # texts encoded in length-sorted groups of this size (less padding)
    feature_cache: bool = True          # a locked tower's features are computed once and cached on disk (LiT)
    seed: int = 0
    checkpoint_every: int = 50          # steps; also at every epoch end
    max_steps: int | None = None        # stop early (tests, smoke runs)
    eval_batch_size: int = 64
    fraction: float = 1.0               # share of the training rows used (data-efficiency sweeps)
    device: str = "cpu"
    report_to: tuple[str, ...] = ()     # tensorboard and/or wandb, besides metrics.csv (training/logging.py)
    suite: str | None = None            # a benchmark suite YAML scored at every validation (logged, RUN/suite/)
    select_by_suite: bool = False       # choose the checkpoint by the suite's average instead of the val score
    store: str | None = None            # image store folder (--store); None: $CLIPMED_CACHE/store
    store_format: str = "png"           # png (lossless) | jpeg (q95)
    workers: int | None = None          # processes building the image store; None: one per core
    loader_workers: int | None = None   # DataLoader processes reading the store; None: measured default
    augment: bool = False               # random resized crop, rotation, brightness/contrast (training only)
    aug_scale: tuple[float, float] = (0.9, 1.0)  # area range of the random resized crop
    aug_rotation: float = 10.0          # degrees, uniform in +-
    aug_jitter: float = 0.1             # brightness and contrast factors uniform in 1 +-
    aug_hflip: bool = False             # horizontal flips (off: laterality matters in medical images)
    val_every: int | None = None        # also validate (and save model/ when better) every N steps
    val_max_rows: int | None = None     # validate on a fixed seeded subset of at most M val rows

    def speed(self) -> Speed:
        """The speed choices asked for (clipmed.machine.resolve puts them over its rule table)."""
        return Speed(precision=self.precision, image_precision=self.image_precision, text_precision=self.text_precision,
                     memory_format=self.memory_format, fuse_conv_bn=self.fuse_conv_bn, attention=self.attention,
                     threads=self.threads,
                     compile=self.compile)

    def resolved_lr_clip(self) -> float:
        return self.lr_clip if self.lr_clip is not None else CLIP_PRETRAIN_LR * self.batch_size / CLIP_PRETRAIN_BATCH

    def store_options(self) -> StoreOptions:
        return StoreOptions(root=self.store, format=self.store_format, workers=self.workers)

    def augmentation(self) -> Augment | None:
        """The training augmentation, None without --augment."""
        if not self.augment:
            return None
        return Augment(scale=tuple(self.aug_scale), rotation=self.aug_rotation, jitter=self.aug_jitter,
                       hflip=self.aug_hflip)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)
