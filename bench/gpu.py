"""Training throughput on a GPU, side by side in one run: clipmed vs open_clip vs a plain transformers loop on
ViT-B/32 steps (random weights, bf16 autocast for every contender, AdamW step included), then one epoch of
clipmed's default dual model on captions through `clipmed train` (its own data path and machine choices).
MFU against the GPU's measured bf16 matmul peak.

    python bench/gpu.py --out bench/results/gpu.json           # on a machine with a CUDA GPU
    python bench/gpu.py --smoke                                # the same code on the CPU, tiny sizes (a check)

The ViT-B/32 rows reuse bench/train_throughput.py's contenders, so both benchmarks time the same work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (alternate, bf16_matmul_peak, clip_tokenizer_dir, machine, print_table, roco_captions,  # noqa: E402
                    synchronize, synthetic_imagefolder, synthetic_records, write_results)
from train_throughput import clipmed_step, forward_flops_per_pair, open_clip_step, transformers_step  # noqa: E402

GPU_PEAK_SHAPES = ((8192, 8192, 8192), (16384, 8192, 8192))
SMOKE_PEAK_SHAPES = ((512, 512, 512),)


def synced(step, device: str):
    """A step that returns only once the device has finished its work."""
    def run() -> None:
        step()
        synchronize(device)
    return run


def vit_rows(device: str, batch: int, args: argparse.Namespace) -> dict:
    """pairs/s of each contender on the real-caption batch, and the nominal training FLOPs per pair."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clipmed.data.datasets import pixel_batches
    from clipmed.models import HFCLIP

    tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer_dir())
    config = CLIPConfig()  # ViT-B/32
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    records = synthetic_records(batch)
    texts = random.Random(0).sample(roco_captions(max(2000, batch)), batch)
    model = HFCLIP(CLIPModel(config), processor, source="bench").to(device)
    pixels = model.normalize_pixels(next(pixel_batches([r.image_path for r in records], 224, "bicubic",
                                                       batch_size=len(records))))
    reference = CLIPModel(config).eval()
    flops = 3 * forward_flops_per_pair(
        lambda x: reference.get_image_features(pixel_values=x),
        lambda t: reference.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]),
        224, 77)
    del reference
    contenders = {"clipmed": clipmed_step(model, "caption", records, texts, None, precision="bf16", device=device),
                  "transformers": transformers_step(config, tokenizer, pixels, texts, device=device),
                  "open_clip": open_clip_step(pixels, texts, device=device)}
    seconds = alternate({name: synced(step, device) for name, step in contenders.items()},
                        warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    return {"flops_per_pair": flops, **{name: {"pairs_per_s": batch / s} for name, s in seconds.items()}}


def dual_epoch(device: str, batch: int, rows: int, data: str | None, work: Path) -> dict:
    """One caption epoch of the dual default through clipmed's trainer; pairs/s from its metrics.csv (steady
    steps: the first, which warms the kernels, is left out)."""
    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare
    from clipmed.training.config import TrainConfig
    from clipmed.training.train import train

    if data is None:
        source = synthetic_imagefolder(Path(tempfile.mkdtemp(prefix="bench-gpu-data-")), rows)
        data = str(work / "prepared")
        prepare(str(source), data, fields=FieldMap(), min_class_count=1, n=rows, progress=False)
    started = time.perf_counter()
    run = train(TrainConfig(data=data, out=str(work / "dual"), objective="caption", epochs=1, batch_size=batch,
                            device=device), progress=False)
    seconds = time.perf_counter() - started
    with open(run / "metrics.csv") as handle:
        rates = [float(row["pairs_per_s"]) for row in csv.DictReader(handle)]
    steady = rates[1:] or rates
    recorded = json.loads((run / "run.json").read_text())["machine"]
    return {"pairs_per_s": sum(steady) / len(steady), "steps": len(rates), "epoch_seconds": seconds,
            "machine_choices": recorded["choices"], "decided_by": recorded["decided_by"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny batch and data: checks the script runs")
    parser.add_argument("--batch", type=int, help="ViT-B/32 batch (default 256 on a GPU, 2 with --smoke)")
    parser.add_argument("--dual-batch", type=int, help="dual epoch batch (default 128, 4 with --smoke)")
    parser.add_argument("--dual-rows", type=int, default=4096, help="synthetic rows of the dual epoch")
    parser.add_argument("--data", help="a prepared folder for the dual epoch instead of synthetic rows")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.smoke:
        device, batch, dual_batch = "cpu", args.batch or 2, args.dual_batch or 4
        args.steps = args.rounds = args.warmup = 1
        args.dual_rows = min(args.dual_rows, 24)
        peak_shapes = SMOKE_PEAK_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (use --smoke to check it on the CPU)")
        device, batch, dual_batch = "cuda", args.batch or 256, args.dual_batch or 128
        peak_shapes = GPU_PEAK_SHAPES
    torch.manual_seed(0)
    peak = bf16_matmul_peak(peak_shapes, repeats=5, device=device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results = {"machine": machine(), "device": device,
               "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
               "batch": batch, "dual_batch": dual_batch, "vit_b32": vit_rows(device, batch, args),
               "dual_caption_epoch": dual_epoch(device, dual_batch, args.dual_rows, args.data, work)}
    peak = max(peak, bf16_matmul_peak(peak_shapes, repeats=5, device=device))
    results["bf16_peak_tflops"] = peak / 1e12
    results["load_average_after"] = os.getloadavg()
    vit = results["vit_b32"]
    rows = []
    for name in ("clipmed", "transformers", "open_clip"):
        vit[name]["mfu_bf16"] = vit[name]["pairs_per_s"] * vit["flops_per_pair"] / peak
        ratio = vit[name]["pairs_per_s"] / vit["open_clip"]["pairs_per_s"]
        rows.append([f"ViT-B/32, batch {batch}", name, f"{vit[name]['pairs_per_s']:.1f}", f"{ratio:.2f}",
                     f"{100 * vit[name]['mfu_bf16']:.1f}"])
    dual = results["dual_caption_epoch"]
    rows.append([f"dual epoch, batch {dual_batch}", "clipmed", f"{dual['pairs_per_s']:.1f}", "", ""])
    print(f"{results['gpu'] or 'CPU (smoke)'}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    print_table(["work", "contender", "pairs/s", "vs open_clip", "MFU %"], rows)
    print(f"dual epoch: {dual['epoch_seconds']:.1f} s, choices {dual['machine_choices']}")
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
