"""Augmentation on or off: the same runs with and without --augment, compared on the validation split (never test).

    python bench/augmentation.py --runs runs/roco/runs --objectives label,caption

RUNS/<objective> is a finished run without augmentation (`clipmed reproduce` writes them); its run.json gives
every setting. This trains RUNS/<objective>-augment with the same settings plus --augment (skipped when it is
already done), then scores both models on every val row with the score the objective selects checkpoints by
(label: zero-shot top-1 with the training prompt; caption: the mean of image->text and text->image recall@1, a
row's value being the mean of its two hits), each tower in the precision it trained in. Intervals are 95%
percentile bootstraps over val rows, the same resamples for both models, so the difference's interval is paired.
Results: bench/results/augmentation.json and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_results  # noqa: E402

from clipmed.data.split import load_prepared  # noqa: E402
from clipmed.evaluation.embed import embed_images, embed_texts  # noqa: E402
from clipmed.evaluation.metrics import bootstrap_mean_intervals  # noqa: E402
from clipmed.evaluation.zeroshot import class_embeddings, zero_shot_scores  # noqa: E402
from clipmed.io import read_json  # noqa: E402
from clipmed.models import load_model  # noqa: E402
from clipmed.objectives import get_objective  # noqa: E402
from clipmed.training.config import TrainConfig  # noqa: E402
from clipmed.training.train import train  # noqa: E402

N_BOOT = 1000


def row_scores(run: Path, prepared, selection: str, template: str) -> np.ndarray:
    """Per val row, its share of the selection score (the mean over rows is the score)."""
    choices = read_json(run / "run.json")["machine"]["choices"]
    model = load_model(str(run / "model"))
    val = prepared.records("val")
    images = embed_images(model, val, precision=choices["image_precision"])
    if selection == "zero_shot":
        weights = class_embeddings(model, prepared.classes, [template], precision=choices["text_precision"])
        truth = torch.tensor([prepared.classes.index(r.label) for r in val])
        return (zero_shot_scores(images, weights).argmax(dim=1) == truth).double().numpy()
    texts = embed_texts(model, [r.caption for r in val], precision=choices["text_precision"])
    similarity = images @ texts.t()
    diagonal = torch.arange(len(val))
    # argmax takes the first maximum: ties rank by index, as clipmed's retrieval metrics do.
    return (((similarity.argmax(dim=1) == diagonal).double() + (similarity.argmax(dim=0) == diagonal).double()) / 2
            ).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/roco/runs", help="folder of the runs without augmentation")
    parser.add_argument("--objectives", default="label,caption")
    parser.add_argument("--out", default="bench/results/augmentation.json")
    args = parser.parse_args()
    results: dict = {"machine": machine(), "n_boot": N_BOOT, "objectives": {}}
    rows = []
    for name in args.objectives.split(","):
        base = Path(args.runs) / name
        saved = read_json(base / "run.json")
        if saved["config"].get("augment"):
            raise SystemExit(f"{base} was trained with --augment: give the run without it")
        augmented = Path(args.runs) / f"{name}-augment"
        started = time.time()
        if not (augmented / "run.json").is_file() or read_json(augmented / "run.json")["status"] != "done":
            resume = (augmented / "run.json").is_file()
            train(TrainConfig.from_dict({**saved["config"], "augment": True, "out": str(augmented)}), resume=resume)
        seconds = round(time.time() - started, 1)
        config = TrainConfig.from_dict(saved["config"])
        prepared = load_prepared(config.data)
        selection = get_objective(config.objective).selection
        off = row_scores(base, prepared, selection, config.label_template)
        on = row_scores(augmented, prepared, selection, config.label_template)
        ci_off, ci_on, ci_diff = bootstrap_mean_intervals(np.stack([off, on, on - off], axis=1), N_BOOT, config.seed)
        entry = {"selection": selection, "val_rows": len(off), "without": float(off.mean()), "with": float(on.mean()),
                 "difference": float((on - off).mean()), "ci95": {"without": ci_off, "with": ci_on,
                                                                   "difference": ci_diff},
                 "runs": {"without": str(base), "with": str(augmented)}, "train_seconds_with": seconds}
        results["objectives"][name] = entry
        rows.append([name, selection, len(off), f"{off.mean():.3f} [{ci_off[0]:.3f}, {ci_off[1]:.3f}]",
                     f"{on.mean():.3f} [{ci_on[0]:.3f}, {ci_on[1]:.3f}]",
                     f"{entry['difference']:+.3f} [{ci_diff[0]:+.3f}, {ci_diff[1]:+.3f}]"])
        write_results(args.out, results)
    print_table(["objective", "val score", "rows", "without --augment", "with --augment", "difference (paired)"], rows)
    print(json.dumps(results["machine"]))


if __name__ == "__main__":
    main()
