"""Training objectives, one module each, and the registry that maps their names to them.

Each objective (`base.Objective`) says what the training loop needs: the rows it trains on, how a batch is
made, its loss (a small module mapping normalised embeddings + batch side information to a scalar), how a
checkpoint is selected (label-free for label-free objectives) and which texts are fixed. The loop only calls
these; choosing one is `get_objective(name)`, and the CLI's choices, reproduce's defaults and the per-objective
epoch flags come from `OBJECTIVES`.
  caption   CLIP's symmetric InfoNCE: the paired text is the only positive;
  label     images against the distinct prompts of their labels: same-label pairs are positives
            (multi-positive), or the paper's naive one-positive N x N targets;
  semantic  MedCLIP's semantic matching: targets from the similarity of concept vectors;
  siglip    SigLIP's pairwise sigmoid loss with a learnable bias.
"""

from __future__ import annotations

from ..errors import ClipmedError
from .base import Batch, Objective, Selection, TrainingRows, soft_cross_entropy, symmetric_loss
from .caption import Caption, ContrastiveLoss
from .label import Label, LabelLoss, LabelOptions
from .semantic import Semantic, SemanticMatchingLoss, SemanticOptions
from .siglip import Siglip, SiglipOptions, SigmoidLoss

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (Caption(), Label(), Semantic(), Siglip())}
# What `clipmed reproduce` trains unless --objectives says otherwise.
REPRODUCE_OBJECTIVES: tuple[str, ...] = tuple(name for name, o in OBJECTIVES.items() if o.in_reproduce)

__all__ = ["OBJECTIVES", "REPRODUCE_OBJECTIVES", "Batch", "ContrastiveLoss", "LabelLoss", "LabelOptions", "Objective",
           "Selection", "SemanticMatchingLoss", "SemanticOptions", "SigmoidLoss", "SiglipOptions", "TrainingRows",
           "get_objective", "soft_cross_entropy", "symmetric_loss"]


def get_objective(name: str) -> Objective:
    """The registered objective of that name, or a one-line error listing them."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ClipmedError(f"unknown objective {name!r}: use one of {', '.join(OBJECTIVES)}") from None
