"""Training configuration as plain data; every run writes it, resolved, into run.json.

Each field declared with `option` is also a command-line flag of `clipmed train` (and, prefixed `train.`, of
`reproduce` and `sweep`): see `clipmed.options`. Every objective's own options are declared in its module and
come in as base classes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..data.datasets import Augment
from ..errors import ClipmedError
from ..data.store import StoreOptions
from ..machine import ATTENTIONS, AUTO, MEMORY_FORMATS, Speed
from ..models import DEFAULT_SPEC
from ..objectives import OBJECTIVES, LabelOptions, SemanticOptions, SiglipOptions
from ..options import AUTO_ON_OFF, MAX_SEED, option
from ..precision import PRECISIONS
from .logging import REPORTERS

# CLIP ViT-B/32 pretraining: lr 5e-4 at batch 32,768. Fine-tuning a pretrained CLIP scales it by batch size
# (the paper's rule: "downscaled in proportion to how much smaller our batch size was").
CLIP_PRETRAIN_LR = 5e-4
CLIP_PRETRAIN_BATCH = 32768
# Set by reproduce for each run it trains: not part of a recipe's training section.
PER_RUN_FIELDS = ("data", "out", "model", "objective", "seed")


@dataclass
class TrainConfig(LabelOptions, SemanticOptions, SiglipOptions):
    data: str = option("", "prepared folder (written by `clipmed prepare`)", metavar="PREPARED")
    out: str = option("", "run folder", metavar="RUN")
    model: str = option(DEFAULT_SPEC, "dual:..., hf:..., openclip:..., or a run folder")
    init: str | None = option(None, "start from this run's (or model folder's) weights instead of --model's",
                              metavar="RUN")
    objective: str = option("caption", "what the model is trained to match", choices=tuple(OBJECTIVES))
    epochs: int = option(3, "passes over the training rows", min=1)
    batch_size: int = option(32, "pairs per optimisation step (every other pair of the batch is a negative)", min=2)
    lr_clip: float | None = option(None, "rate for weights of a pretrained CLIP (default: CLIP's pretraining rate "
                                   "5e-4 scaled by batch/32768)", above=0, max=1)
    lr_pretrained: float = option(1e-4, "rate for towers pretrained alone (ImageNet CNN, MiniLM)", above=0, max=1)
    lr_new: float = option(1e-3, "rate for fresh projections, the temperature and LoRA adapters", above=0,
                           max=1)
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases, norms, temperature)", min=0)
    warmup_fraction: float = option(0.1, "share of steps with a linear warmup, then cosine to zero", min=0, max=1)
    lp_epochs: int = option(0, "LP-FT: first train only the projections and temperature for N epochs, then the "
                            "whole model for --epochs", min=0)
    lora_rank: int = option(0, "train LoRA adapters of this rank (peft) instead of the towers' weights; the "
                            "projections and temperature train fully; 0: full fine-tuning", min=0)
    lora_alpha: float | None = option(None, "LoRA scale numerator: adapters add alpha/rank x BA (default: 2 x rank)",
                                      above=0)
    lora_targets: tuple[str, ...] = option((), "names (suffixes) of the modules LoRA adapts (default: every linear "
                                           "layer of the transformer towers)", metavar="NAME,...")
    lock_image: bool = option(False, "freeze the image tower")
    lock_text: bool = option(False, "freeze the text tower")
    freeze_batchnorm: bool = option(True, "update BatchNorm running statistics while training (default: frozen, "
                                    "as pretrained: fine-tuning batches are small)", flag="--update-batchnorm")
    # Speed choices (clipmed.machine decides each per machine; "auto" / None / 0 leave it to its rule table,
    # anything else forces it). A run records the resolved choices in run.json; a resumed run reuses them.
    precision: str = option(AUTO, "both towers' autocast (auto: decided for this machine, recorded in run.json)",
                            choices=(AUTO, *PRECISIONS))
    image_precision: str = option(AUTO, "the image tower's, over --precision", choices=(AUTO, *PRECISIONS))
    text_precision: str = option(AUTO, "the text tower's, over --precision", choices=(AUTO, *PRECISIONS))
    memory_format: str = option(AUTO, "a convolutional image tower's memory format", choices=(AUTO, *MEMORY_FORMATS))
    fuse_conv_bn: bool | None = option(None, "fold frozen BatchNorm into the convolution before it (same function, "
                                       "one pass)", choices=AUTO_ON_OFF)
    attention: str = option(AUTO, "attention kernel: plain matmul + softmax, or torch's fused kernels",
                            choices=(AUTO, *ATTENTIONS))
    threads: int = option(0, "torch intra-op threads (0: auto)", min=0)
    accum_steps: int = option(1, "micro-batches per step; the loss still sees every negative of --batch-size "
                              "(GradCache)", min=1)
    grad_checkpointing: bool = option(False, "recompute activations in backward: less memory, more compute")
    compile: bool | None = option(None, "torch.compile the trainable towers (default: decided for this machine)")
    local_loss: bool = option(False, "under torchrun: each process computes the loss terms of its own rows "
                              "against the global batch (open_clip's local loss; same loss, less logit memory)")
    text_bucket: int = 8                # texts encoded in length-sorted groups of this size (less padding)
    feature_cache: bool = option(True, "a locked tower's features are computed once and cached on disk (LiT); "
                                 "--no-feature-cache recomputes them every step")
    seed: int = option(0, "seed of the initialisation and data order", min=0, max=MAX_SEED)
    checkpoint_every: int = option(50, "steps between resume checkpoints (also at every epoch end)", min=1)
    max_steps: int | None = option(None, "stop after this many steps (smoke runs)", min=1)
    eval_batch_size: int = 64
    fraction: float = 1.0               # share of the training rows used (data-efficiency sweeps)
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    report_to: tuple[str, ...] = option((), "also log to TensorBoard (RUN/tensorboard) and/or Weights & Biases "
                                        "(metrics.csv always)", choices=REPORTERS)
    suite: str | None = option(None, "also score this benchmark suite at every validation (validation.csv and "
                               "RUN/suite/; see `clipmed benchmark`)", metavar="SUITE.yaml")
    select_by_suite: bool = option(False, "choose the checkpoint by the suite's average instead of the validation "
                                   "score")
    store: str | None = option(None, "image store folder (default: $CLIPMED_CACHE/store, $CLIPMED_CACHE "
                               "defaulting to ~/.cache/clipmed)", metavar="DIR")
    store_format: str = option("png", "how the store keeps images: png (lossless) or jpeg (q95, about a third the "
                               "size)", choices=("png", "jpeg"))
    workers: int | None = option(None, "processes building the image store (default: one per core)", min=1)
    loader_workers: int | None = option(None, "DataLoader processes reading the store (default: one per two "
                                        "cores, 1 to 4)", min=0)
    augment: bool = option(False, "random resized crop, small rotation, brightness/contrast jitter (training only)")
    aug_scale: tuple[float, float] = option((0.9, 1.0), "area range LOW,HIGH of the random resized crop",
                                            above=0, max=1, metavar="LOW,HIGH")
    aug_rotation: float = option(10.0, "degrees, uniform in +-", min=0)
    aug_jitter: float = option(0.1, "brightness and contrast factors uniform in 1 +- this", min=0, max=1)
    aug_hflip: bool = option(False, "random horizontal flips (off by default: laterality matters in medical images)")
    val_every: int | None = option(None, "also validate every N steps (model/ is saved whenever validation "
                                   "improves)", min=1)
    val_max_rows: int | None = option(None, "validate on a fixed seeded subset of M val rows", min=1)

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
        if len(self.aug_scale) != 2 or self.aug_scale[0] > self.aug_scale[1]:
            raise ClipmedError(f"--aug-scale {','.join(map(str, self.aug_scale))}: need LOW,HIGH with LOW <= HIGH")
        return Augment(scale=tuple(self.aug_scale), rotation=self.aug_rotation, jitter=self.aug_jitter,
                       hflip=self.aug_hflip)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)
