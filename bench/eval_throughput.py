"""Evaluation cost against the bare forward pass: clipmed embeds each split once per model and reuses the
embeddings for zero-shot (single and ensemble), linear probe and retrieval.

    python bench/eval_throughput.py --out bench/results/eval_throughput.json

Times `full_evaluation` (test + train images, test captions, every metric with 1,000 bootstrap resamples)
and the bare forward passes of the same images and captions in the same process, alternating. Then the image
embedding rate (bf16, the default embedding precision) in the layout the machine's rule table gives a loaded model
(`clipmed.machine.ready_for_inference`) against the contiguous, unfolded layout models had before, alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, print_table, roco_captions, synthetic_records, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/eval_throughput.json")
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from clipmed.data.store import open_store
    from clipmed.evaluation.embed import embed_images, embed_texts
    from clipmed.evaluation.evaluate import EvalConfig, full_evaluation
    from clipmed.knowledge import load_templates
    from clipmed.machine import Speed, apply_to_model, facts, resolve
    from clipmed.models import load_model

    classes = ["Abdomen", "Chest", "Dental", "Extremity", "Head and Neck", "Pelvis", "Spine"]
    rng = random.Random(0)
    captions = roco_captions(args.test)
    records = [dataclasses.replace(r, caption=captions[i % len(captions)], label=rng.choice(classes))
               for i, r in enumerate(synthetic_records(args.test + args.train))]
    test, train = records[:args.test], records[args.test:]
    model = load_model("dual:efficientnet-lite0+minilm")
    open_store([r.image_path for r in records], model.preprocess.size, model.preprocess.interpolation)  # built once
    templates = load_templates("body_part")

    def bare() -> None:
        embed_images(model, test)
        embed_texts(model, [r.caption for r in test])
        embed_images(model, train)

    def evaluation() -> None:
        full_evaluation(model, test, train, classes, templates, EvalConfig())

    times = {"bare forward": [], "full evaluation": []}
    with torch.no_grad():
        bare()  # warm-up
    for _ in range(args.rounds):
        for name, run in (("bare forward", bare), ("full evaluation", evaluation)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    overhead = best["full evaluation"] / best["bare forward"] - 1

    # Image embedding layout: the rule table's (what `model` now has) against contiguous and unfolded.
    contiguous = load_model("dual:efficientnet-lite0+minilm")
    apply_to_model(contiguous, resolve(Speed(memory_format="contiguous"), facts("cpu"))[0])
    layouts = {f"rule table ({model.machine_choices.memory_format}, BatchNorm "
               f"{'folded' if model.machine_choices.fuse_conv_bn else 'not folded'})": model,
               "contiguous, BatchNorm not folded (before)": contiguous}
    seconds = alternate({name: (lambda m=m: embed_images(m, train)) for name, m in layouts.items()},
                        warmup=1, steps=1, rounds=args.rounds)
    rates = {name: len(train) / s for name, s in seconds.items()}
    results = {"machine": machine(), "test_rows": args.test, "train_rows": args.train,
               "seconds": best, "overhead_vs_bare_forward": overhead, "image_embedding_per_s": rates,
               "rule_choices": model.machine_choices.to_dict()}
    print_table(["what", "seconds"], [[name, f"{s:.2f}"] for name, s in best.items()])
    print(f"evaluation overhead over the bare forward pass: {100 * overhead:+.1f}% (target: within 20%)")
    print_table(["image embedding layout (bf16)", "images/s"], [[name, f"{r:.1f}"] for name, r in rates.items()])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
