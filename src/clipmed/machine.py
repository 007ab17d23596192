"""Speed choices that depend on the machine, decided in one place.

Which precision each tower runs in, the image tower's memory format, whether frozen BatchNorm is folded into its
convolution, the attention kernel, the thread count and torch.compile all change how fast a step runs, not what
it computes (within bf16 rounding where a tower runs in bf16). The fastest setting differs between machines and
models: EfficientNet-Lite0's depthwise convolutions ran faster in fp32 channels_last than in bf16 on an Intel Xeon
with AMX and on an AMD EPYC with AVX512-BF16, while transformers' matmuls gain from bf16. A rule table
(`decide`) maps the machine's facts (CPU flags, CUDA capability) to choices; every choice can be forced
(`Speed` fields other than "auto"); a run records the resolved choices in run.json and a resumed run reuses
them instead of deciding again (`resolve(..., recorded=...)`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ClipmedError
from .precision import PRECISIONS

MEMORY_FORMATS = ("channels_last", "contiguous")
ATTENTIONS = ("matmul", "fused")  # plain matmul + softmax, or torch's fused scaled-dot-product kernels
AUTO = "auto"


@dataclass(frozen=True)
class Choices:
    """The resolved speed choices of one run (what run.json records under "machine")."""

    image_precision: str   # bf16 | fp32: the image tower's autocast
    text_precision: str    # bf16 | fp32: the text tower's autocast
    memory_format: str     # channels_last | contiguous: the image tower's activations and weights
    fuse_conv_bn: bool     # frozen BatchNorm folded into the convolution before it (same function, one pass)
    attention: str         # matmul | fused
    threads: int           # torch intra-op threads (CPU)
    compile: bool          # torch.compile the trainable towers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Choices":
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ClipmedError(f"recorded machine choices {sorted(values)} do not match this clipmed's "
                               f"{sorted(names)}: resume the run with the clipmed version that started it")
        return cls(**values)


@dataclass(frozen=True)
class Speed:
    """What the user asked for: "auto" (or None / 0) leaves a choice to the rule table, anything else forces it."""

    precision: str = AUTO              # both towers, unless one is given below
    image_precision: str = AUTO
    text_precision: str = AUTO
    memory_format: str = AUTO
    fuse_conv_bn: bool | None = None
    attention: str = AUTO
    threads: int = 0
    compile: bool | None = None


@dataclass(frozen=True)
class Facts:
    """What the rule table looks at."""

    device: str                                    # cpu | cuda | ...
    cpu_model: str
    cpu_flags: frozenset[str]
    cpu_capability: str                            # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, ...
    cores: int                                     # CPUs this process may run on
    cuda_capability: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {"device": self.device, "cpu_model": self.cpu_model, "cpu_capability": self.cpu_capability,
                "cpu_flags": sorted(self.cpu_flags & _RELEVANT_FLAGS), "cores": self.cores,
                "cuda_capability": list(self.cuda_capability) if self.cuda_capability else None}


_RELEVANT_FLAGS = frozenset({"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2",
                             "avx512_fp16"})


def decide(facts: Facts, image_tower: str = "conv") -> tuple[Choices, str]:
    """The rule table: the machine's facts and the kind of image tower ("conv": a CNN, "transformer": a ViT)
    -> (choices, the name of the rule that chose them). Transformers are matmuls: bf16 wherever the machine has
    bf16 instructions; the CNN rules are the measured ones below."""
    choices, rule = _decide_conv(facts)
    if image_tower == "transformer" and choices.text_precision == "bf16" and choices.image_precision != "bf16":
        return Choices(**{**choices.to_dict(), "image_precision": "bf16"}), rule + " (ViT image tower: bf16)"
    return choices, rule


def _decide_conv(facts: Facts) -> tuple[Choices, str]:
    if facts.device == "cuda":
        bf16 = facts.cuda_capability is not None and facts.cuda_capability >= (8, 0)  # Ampere and later
        precision = "bf16" if bf16 else "fp32"
        return Choices(image_precision=precision, text_precision=precision, memory_format="channels_last",
                       fuse_conv_bn=True, attention=attention_for("cuda"), threads=facts.cores, compile=False), \
            "cuda: bf16 from capability 8.0 (else fp32), channels_last, fused attention"
    flags = facts.cpu_flags
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        # EfficientNet-Lite0's depthwise convolutions do not gain from bf16, the text transformer's matmuls do;
        # channels_last is the image tower's main gain. Measured on an Intel Xeon with AMX and on an AMD EPYC with
        # AVX512-BF16 (README, Performance: per-machine choices).
        return Choices(image_precision="fp32", text_precision="bf16", memory_format="channels_last",
                       fuse_conv_bn=True, attention=attention_for("cpu"), threads=facts.cores, compile=False), \
            "cpu with bf16 instructions (amx_bf16 or avx512_bf16): fp32 channels_last image tower, bf16 text tower"
    # No bf16 instructions: torch emulates bf16 arithmetic, slower than fp32.
    return Choices(image_precision="fp32", text_precision="fp32", memory_format="channels_last",
                   fuse_conv_bn=True, attention=attention_for("cpu"), threads=facts.cores, compile=False), \
        "cpu without bf16 instructions: fp32"


def attention_for(device: torch.device | str) -> str:
    """The attention kernel of a device kind: on the CPU torch's fused kernel has a slow backward at CLIP's 50-77
    tokens and plain matmul + softmax runs the training step faster (README, Performance), on GPUs the fused
    kernels are the fast ones."""
    return "matmul" if torch.device(device).type == "cpu" else "fused"


def resolve(speed: Speed, facts: Facts, *, image_tower: str = "conv",
            recorded: dict | None = None) -> tuple[Choices, str]:
    """The choices of a run: recorded ones (a resumed run) as they were, else the rule table's with every forced
    choice of `speed` put over it. Returns (choices, how they were decided)."""
    if recorded is not None:
        return Choices.from_dict(recorded), "recorded by the run (resumed)"
    _check(speed)
    rule_choices, rule = decide(facts, image_tower)
    forced = {}
    for name, value in (("image_precision", speed.image_precision if speed.image_precision != AUTO else speed.precision),
                        ("text_precision", speed.text_precision if speed.text_precision != AUTO else speed.precision),
                        ("memory_format", speed.memory_format), ("attention", speed.attention)):
        if value != AUTO:
            forced[name] = value
    for name in ("fuse_conv_bn", "compile"):
        if getattr(speed, name) is not None:
            forced[name] = getattr(speed, name)
    if speed.threads:
        forced["threads"] = speed.threads
    implied = {}
    if forced.get("memory_format") == "contiguous" and "fuse_conv_bn" not in forced:
        # Folding builds new weights every step; in the contiguous layout oneDNN then reorders them each time and
        # the image tower ran slower than unfolded (README, Performance). It pays in channels_last only.
        implied["fuse_conv_bn"] = False
    choices = Choices(**{**rule_choices.to_dict(), **forced, **implied})
    how = rule + (f"; forced: {', '.join(sorted(forced))}" if forced else "")
    return choices, how + ("; BatchNorm not folded in the contiguous layout" if implied else "")


def _check(speed: Speed) -> None:
    for name, allowed in (("precision", PRECISIONS), ("image_precision", PRECISIONS), ("text_precision", PRECISIONS),
                          ("memory_format", MEMORY_FORMATS), ("attention", ATTENTIONS)):
        value = getattr(speed, name)
        if value != AUTO and value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise ClipmedError(f"{flag} {value!r} is not one of auto, {', '.join(allowed)}")
    cpus = os.cpu_count() or 1
    if not 0 <= speed.threads <= cpus:
        raise ClipmedError(f"--threads {speed.threads} must be between 1 and this machine's {cpus} CPUs (0: as "
                           "many as this process may use)")


def facts(device: torch.device | str = "cpu") -> Facts:
    """This machine's facts for `device`."""
    device = torch.device(device)
    model, flags = _cpuinfo()
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return Facts(device=device.type, cpu_model=model, cpu_flags=flags,
                 cpu_capability=torch.backends.cpu.get_cpu_capability(), cores=_cores(), cuda_capability=capability)


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (macOS, Windows)."""
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


# torch's own default (physical cores), read before any run sets another.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def _cores() -> int:
    """CPUs this process may run on (affinity), at most the physical cores torch counts by default."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, _TORCH_DEFAULT_THREADS))


def apply_threads(choices: Choices) -> None:
    """Set torch's intra-op thread count to the chosen one."""
    if torch.get_num_threads() != choices.threads:
        torch.set_num_threads(choices.threads)


def apply_to_model(model, choices: Choices) -> None:
    """Put the choices that live in the model into it: the attention kernel, the image tower's memory format and
    the BatchNorm fold (and remember them: `model.machine_choices`). Everything that runs the towers for a run
    (its steps, its locked-tower feature cache, its validation) runs after this, so they all compute the same
    function the same way."""
    model.select_attention(choices.attention)
    model.set_speed(channels_last=choices.memory_format == "channels_last", fuse_conv_bn=choices.fuse_conv_bn)
    model.machine_choices = choices


def ready_for_inference(model, device: torch.device | str) -> None:
    """Before computing embeddings: a model a run has put its choices into keeps them (training's validation and
    feature cache compute what its steps compute); any other model (a saved one loaded to embed, index or
    evaluate) gets the rule table's layout for `device`: memory format, BatchNorm fold, attention kernel. The
    precision stays the caller's (embeddings are bf16 by default everywhere)."""
    if model.machine_choices is None:
        apply_to_model(model, decide(facts(device), model.image_tower_kind)[0])
