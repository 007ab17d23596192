"""How many DataLoader worker processes should read the image store: the same short caption run of the default
model on roco-radiology with 0, 1, 2, ... loader workers, with and without --augment (augmentation is the loader's
heaviest work), reporting steady pairs/s and the share of each step spent waiting for images (metrics.csv's
data_wait_s). The store is built (and timed) before the first contender; contenders run one after another.

    python bench/loader_workers.py --prepared PREPARED --workers 0,1,2 --steps 12
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, write_results


def train(prepared: str, out: Path, workers: int, steps: int, augment: bool = False) -> None:
    """One short `clipmed train` in a fresh process."""
    subprocess.run([sys.executable, "-m", "clipmed.cli", "train", "--data", prepared, "--out", str(out),
                    "--epochs", "1", "--max-steps", str(steps), "--loader-workers", str(workers),
                    "--checkpoint-every", "1000", "--val-max-rows", "32"] + (["--augment"] if augment else []),
                   check=True, capture_output=True, cwd=REPO)


def run(prepared: str, out: Path, workers: int, steps: int, augment: bool = False) -> dict:
    """A contender: steady figures exclude the first two steps (warm-up)."""
    started = time.perf_counter()
    train(prepared, out, workers, steps, augment)
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))[2:]
    step_s = [float(b["elapsed_s"]) - float(a["elapsed_s"]) for a, b in zip(rows, rows[1:])]
    wait = sum(float(r["data_wait_s"]) for r in rows[1:])
    return {"loader_workers": workers, "augment": augment, "pairs_per_s": round(32 * len(step_s) / sum(step_s), 2),
            "data_wait_share": round(wait / sum(step_s), 4), "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="a prepared roco-radiology folder")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--steps", type=int, default=12, help="steps per contender (at least 5)")
    parser.add_argument("--augment", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", default="bench/results/loader_workers.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    env_cache = os.environ.get("CLIPMED_CACHE", "~/.cache/clipmed")
    results = {"machine": machine(), "cpu_count": os.cpu_count(), "cache": env_cache, "runs": []}
    store_started = time.perf_counter()
    train(args.prepared, work / "store-build", 0, 1)  # builds the store if it is missing
    results["first_run_with_store_build_s"] = round(time.perf_counter() - store_started, 1)
    augments = {"off": [False], "on": [True], "both": [False, True]}[args.augment]
    for augment in augments:
        for workers in (int(w) for w in args.workers.split(",")):
            name = f"w{workers}" + ("-augment" if augment else "")
            results["runs"].append(run(args.prepared, work / name, workers, args.steps, augment))
    print("| loader workers | augment | pairs/s | data wait share |\n|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['loader_workers']} | {'on' if r['augment'] else 'off'} | {r['pairs_per_s']} | "
              f"{100 * r['data_wait_share']:.1f}% |")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
