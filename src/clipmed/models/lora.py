"""LoRA adapters on a model's towers through peft, and merging them back so that a saved model is a plain
model of its family (opened without peft or clipmed).

Which layers get adapters (`ClipModel.lora_targets`, or `--lora-targets`): every linear layer of a transformer
tower (attention projections and MLP). The dual default's convolutional image tower gets none and trains fully:
LoRA pays where weights dominate the memory and the update, as in MiniLM's 22M; EfficientNet-Lite0 has 3.4M,
its optimizer state is 27 MB against activations of hundreds of MB per batch, and peft cannot wrap its
convolution class (same-padding convolutions built for a fixed image size). `--lock-image` freezes it instead.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from ..errors import ClipmedError, first_line
from .base import ClipModel

_TUNERS = "_lora_tuners"


def add_lora(model: ClipModel, rank: int, *, alpha: float | None = None, targets: Sequence[str] = (),
             towers: Sequence[str] = ("image", "text")) -> dict[str, list[str]]:
    """Inject rank-`rank` adapters into `towers` (in place); the towers' own weights stop training, their
    adapters train. Returns {tower: target module names}. `targets` (module-name suffixes) replaces the
    family's choice; a tower none of whose modules match keeps training fully, and no match at all is an error."""
    if not targets and not any(model.lora_targets()[name] for name in towers):
        raise ClipmedError(f"{model.family} models have no default LoRA layers in the {' or '.join(towers)} tower: "
                           "name them with --lora-targets")
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    chosen = {name: list(targets) if targets else model.lora_targets()[name] for name in towers}
    chosen = {name: suffixes for name, suffixes in chosen.items() if suffixes}
    tuners, applied = [], {}
    for name, suffixes in chosen.items():
        tower = model.towers()[name]
        if not any(module.endswith(tuple(suffixes)) for module, _ in tower.named_modules()):
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=suffixes,
                            lora_dropout=0.0, bias="none")
        try:
            tuners.append(LoraModel(tower, config, "default"))
        except (ValueError, TypeError, AssertionError) as exc:  # a layer type peft cannot adapt
            raise ClipmedError(f"peft cannot add LoRA to the {name} tower's {','.join(suffixes)} layers "
                               f"({type(exc).__name__}: {first_line(exc) or 'unsupported layer'}); choose linear layers "
                               "with --lora-targets") from None
        applied[name] = suffixes
    if not applied:
        raise ClipmedError(f"--lora-targets {','.join(targets)} match no layer of the {' or '.join(towers)} tower: "
                           f"name module suffixes such as {', '.join(sorted({t for n in towers for t in model.lora_targets()[n]}))}")
    # Kept off the module tree (plain attribute): the adapters' parameters are the towers' own already.
    object.__setattr__(model, _TUNERS, tuners)
    return applied


def merged(model: ClipModel) -> ClipModel:
    """`model` itself when it has no adapters, else a copy with W + scale * B A folded into each adapted layer
    and the adapters removed (the training model keeps its adapters)."""
    if not getattr(model, _TUNERS, None):
        return model
    copied = copy.deepcopy(model)
    for tuner in getattr(copied, _TUNERS):
        tuner.merge_and_unload()
    object.__setattr__(copied, _TUNERS, [])
    return copied


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
