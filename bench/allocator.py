"""The allocator setting, side by side: the default dual model's caption step (batch 32, AdamW included) with
glibc's default (each freed block over 32 MB returned to the OS, so every step faults its activations in again)
against clipmed's `keep_freed_memory` (clipmed.processes), each in fresh processes, alternating.

    python bench/allocator.py --out bench/results/allocator.json

Reports the first step, the median steady step, minor page faults, system CPU time and peak RSS of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, print_table, write_results  # noqa: E402

CHILD = """
import json, random, resource, sys, time
sys.path.insert(0, {bench!r})
from clipmed.processes import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
from common import synthetic_records
from train_throughput import clipmed_step, scenario_texts
from clipmed.models import load_model

if __name__ == "__main__":
    texts, labels = scenario_texts("captions", random.Random(0))
    step = clipmed_step(load_model("dual:efficientnet-lite0+minilm"), "caption", synthetic_records(32), texts, labels)
    start = time.perf_counter(); step(); first = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steady = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter(); step(); steady.append(time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({{"first_s": first, "steady_s": steady, "steady_faults": usage.ru_minflt - faults,
                       "system_s": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}}))
"""
MODES = {"system": "glibc default", "keep": "keep_freed_memory (clipmed's default)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/allocator.json")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per setting, alternating")
    parser.add_argument("--steps", type=int, default=6, help="steady steps timed per process")
    args = parser.parse_args()
    # A file, not `python -c`: the store build's spawned workers re-import the child's main module.
    child = Path(tempfile.mkdtemp(prefix="bench-allocator-")) / "child.py"
    child.write_text(CHILD.format(bench=str(Path(__file__).resolve().parent)))
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    env = {"PYTHONPATH": str(REPO / "src"),  # the "system" child simply never calls keep_freed_memory
           **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIPMED_MALLOC")}}
    for _ in range(args.rounds):
        for mode in MODES:
            done = subprocess.run([sys.executable, str(child), mode, str(args.steps)], env=env, capture_output=True,
                                  text=True)
            if done.returncode:
                raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            out = done.stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    summary = {mode: {"first_step_s": statistics.median(r["first_s"] for r in rs),
                      "steady_step_s": statistics.median(s for r in rs for s in r["steady_s"]),
                      "steady_faults_per_step": statistics.median(r["steady_faults"] / args.steps for r in rs),
                      "system_s": statistics.median(r["system_s"] for r in rs),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for mode, rs in runs.items()}
    speedup = summary["system"]["steady_step_s"] / summary["keep"]["steady_step_s"]
    print_table(["allocator", "first step s", "steady step s", "pairs/s", "faults/step", "system CPU s", "peak MiB"],
                [[MODES[m], f"{s['first_step_s']:.2f}", f"{s['steady_step_s']:.2f}", f"{32 / s['steady_step_s']:.1f}",
                  f"{s['steady_faults_per_step']:.0f}", f"{s['system_s']:.1f}", f"{s['peak_rss_mib']:.0f}"]
                 for m, s in summary.items()])
    print(f"steady step, kept / default: {speedup:.2f}x faster")
    write_results(args.out, {"machine": machine(), "batch": 32, "rounds": args.rounds, "steps": args.steps,
                             "settings": summary, "steady_speedup": speedup, "runs": runs})


if __name__ == "__main__":
    main()
