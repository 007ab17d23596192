"""WiSE-FT (Wortsman et al. 2022): weights interpolated between a zero-shot (base) model and its fine-tuned
version, (1 - a) * base + a * finetuned, with `a` chosen on the validation split without test labels.

The choice maximises the mean of val zero-shot top-1 and val image<->caption recall@1, so it rewards keeping
both what the fine-tuning taught and what the base knew. RUN/ is a run folder: model/ (the chosen mixture, a
plain model of its family) and run.json, whose `wise_ft` holds every a's val scores and the chosen one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.datasets import readable_records
from ..data.split import load_prepared
from ..errors import ClipmedError
from ..io import read_json, write_json_atomic
from ..knowledge.prompts import DEFAULT_TEMPLATE
from ..locking import FileLock
from ..models import ClipModel, load_model
from ..options import MAX_SEED, option
from .train import environment, save_model_atomically
from .validation import validation_scores


@dataclass
class WiseFTConfig:
    base: str = option(help="the zero-shot end: a run folder or a model spec", metavar="RUN_OR_SPEC")
    finetuned: str = option(help="the fine-tuned run (or model folder)", metavar="RUN")
    data: str = option(help="prepared folder: the mixing weight is chosen on its val split", metavar="PREPARED")
    out: str = option(help="the new run folder", metavar="RUN")
    alphas: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), "mixing weights a tried: (1 - a) * base + "
                                       "a * finetuned", min=0, max=1)
    seed: int = option(0, "seed of a spec's fresh parts (the dual default's untrained projections)", min=0,
                       max=MAX_SEED)
    precision: str = option("bf16", "autocast precision of the validation passes", choices=("bf16", "fp32"))


def check_same_architecture(base: ClipModel, finetuned: ClipModel, names: tuple[str, str]) -> None:
    """A one-line error unless both models have the same family, parameter names and shapes."""
    a, b = base.state_dict(), finetuned.state_dict()
    differ = next((k for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k].shape != b[k].shape), None)
    if type(base) is not type(finetuned) or differ is not None:
        what = (f"{base.family} vs {finetuned.family} models" if type(base) is not type(finetuned)
                else f"weight {differ!r} " + ("is in one only" if differ not in a or differ not in b
                                              else f"has shape {tuple(a[differ].shape)} vs {tuple(b[differ].shape)}"))
        raise ClipmedError(f"{names[0]} and {names[1]} are not the same architecture ({what}): WiSE-FT mixes two "
                           "versions of one model; pass as --base the model the fine-tuned run started from")


def interpolate(base: ClipModel, finetuned: ClipModel, alpha: float) -> ClipModel:
    """A new model with weights (1 - alpha) * base + alpha * finetuned (integer buffers: the fine-tuned ones).
    alpha = 0 and 1 give exactly the base's and the fine-tuned model's weights."""
    base_state = base.state_dict()
    mixed = {name: (1 - alpha) * base_state[name] + alpha * value if value.is_floating_point() else value
             for name, value in finetuned.state_dict().items()}
    model = copy.deepcopy(finetuned)
    model.load_state_dict(mixed)
    return model


def wise_ft(config: WiseFTConfig) -> Path:
    """Write the run folder `config.out` (see the module docstring); a finished one is left as it is."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out, what="wise-ft"):
        if (out / "run.json").is_file() and read_json(out / "run.json").get("status") == "done":
            return out
        started = time.time()
        # A spec's fresh parts (the dual default's projections) come from the global RNG: seeded, as in training.
        torch.manual_seed(config.seed)
        base, finetuned = load_model(config.base), load_model(config.finetuned)
        check_same_architecture(base, finetuned, (config.base, config.finetuned))
        prepared = load_prepared(config.data)
        readable, _ = readable_records(prepared.records("val"), finetuned.preprocess.size,
                                       finetuned.preprocess.interpolation)
        val = [prepared.records("val")[i] for i in readable]
        run_json = Path(config.finetuned) / "run.json"
        template = (read_json(run_json)["config"].get("label_template", DEFAULT_TEMPLATE) if run_json.is_file()
                    else DEFAULT_TEMPLATE)
        points, best = [], None
        for alpha in config.alphas:
            model = interpolate(base, finetuned, alpha).eval()
            scores = validation_scores(model, val, prepared.classes, ["zero_shot", "retrieval"], template=template,
                                       image_precision=config.precision, text_precision=config.precision)
            point = {"alpha": alpha, **scores, "score": sum(scores.values()) / len(scores)}
            points.append(point)
            if best is None or point["score"] > best[0]["score"]:
                best = (point, model)
        save_model_atomically(best[1], out)
        write_json_atomic(out / "run.json", {
            "status": "done",
            "config": asdict(config),
            "wise_ft": {"base": config.base, "finetuned": config.finetuned, "alphas": points,
                        "chosen": best[0]["alpha"],
                        "selection": "mean of val zero-shot top-1 and val image<->caption recall@1"},
            "split": str(Path(config.data).resolve() / "split.json"),
            "classes": prepared.classes,
            "model": best[1].describe(),
            "trainable_parameters": 0,
            "seconds": round(time.time() - started, 1),
            "environment": environment(),
        })
    return out
