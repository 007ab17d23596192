"""Memory and locked-tower cache figures for the default dual model.

    python bench/memory_and_cache.py --out bench/results/memory_and_cache.json

1. Peak memory (max RSS of a fresh process) and pairs/s of a batch-128 caption step: plain, gradient
   accumulation (GradCache, 4 micro-batches, every negative kept), gradient checkpointing, and both.
2. Epoch time of caption training with the image tower locked, with and without the on-disk feature cache
   (LiT): the cache is built in the first epoch; later epochs run only the text tower and projections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROCO, machine, print_table, write_results  # noqa: E402

MEMORY_VARIANTS = {"plain": {}, "accum 4": {"accum_steps": 4}, "checkpointing": {"grad_checkpointing": True},
                   "accum 4 + checkpointing": {"accum_steps": 4, "grad_checkpointing": True}}


def one_step_in_this_process(options: dict, batch: int, steps: int) -> dict:
    """Run `steps` training steps of the dual model and report max RSS and pairs/s (child process)."""
    import resource

    from common import roco_captions, synthetic_records
    from train_throughput import clipmed_step

    from clipmed.models import load_model

    records = synthetic_records(batch)
    model = load_model("dual:efficientnet-lite0+minilm")
    if options.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    step = clipmed_step(model, "caption", records, roco_captions(batch), None,
                        accum_steps=options.get("accum_steps", 1))
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pairs_per_s": batch / seconds}


def epoch_times(feature_cache: bool, rows: int) -> dict:
    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare
    from clipmed.training.config import TrainConfig
    from clipmed.training.train import train

    work = Path(tempfile.mkdtemp(prefix="lit-bench-"))
    subset = work / "data"
    subset.mkdir()
    lines = (ROCO / "metadata.jsonl").read_text().splitlines()[:rows]
    (subset / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    prepare(str(subset), work / "prepared", fields=FieldMap(group_field="article"), image_root=str(ROCO),
            min_class_count=5, progress=False)
    os.environ["CLIPMED_CACHE"] = str(work / "cache")
    run = train(TrainConfig(data=str(work / "prepared"), out=str(work / "run"), objective="caption", epochs=3,
                            lock_image=True, feature_cache=feature_cache), progress=False)
    with open(run / "metrics.csv") as handle:
        import csv
        steps = list(csv.DictReader(handle))
    by_epoch: dict[int, float] = {}
    for row in steps:
        by_epoch[int(row["epoch"])] = float(row["elapsed_s"])
    ends = [by_epoch[e] for e in sorted(by_epoch)]
    return {"epoch_seconds": [ends[0]] + [b - a for a, b in zip(ends, ends[1:])],
            "total_seconds": json.loads((run / "run.json").read_text())["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/memory_and_cache.json")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=600, help="roco-radiology rows for the cache epochs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step_in_this_process(json.loads(args.child), args.batch, args.steps)))
        return

    memory = {}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    for name, options in MEMORY_VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(options), "--batch", str(args.batch),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True, env=env)
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    cache = {"with cache": epoch_times(True, args.rows), "without cache": epoch_times(False, args.rows)} \
        if (ROCO / "metadata.jsonl").exists() else {}

    print(f"batch {args.batch} caption step, dual default model")
    print_table(["variant", "peak RSS MiB", "pairs/s"],
                [[n, f"{m['max_rss_mib']:.0f}", f"{m['pairs_per_s']:.1f}"] for n, m in memory.items()])
    if cache:
        print("\ncaption training, image tower locked (epoch seconds)")
        print_table(["variant", "epoch 1", "epoch 2", "epoch 3"],
                    [[n, *(f"{s:.1f}" for s in c["epoch_seconds"])] for n, c in cache.items()])
    write_results(args.out, {"machine": machine(), "batch": args.batch, "memory": memory, "locked_image_cache": cache})


if __name__ == "__main__":
    main()
