"""Training throughput, side by side in one run: clipmed's trainer vs a plain transformers CLIPModel loop vs
open_clip's ViT-B-32 with its ClipLoss, on the same work (random ViT-B/32 weights: speed does not depend on
them; batch 32; bf16 autocast; AdamW step included; same thread count), contenders alternating, in a process
whose allocator keeps freed memory as clipmed's CLI and `train()` do (`clipmed.processes.keep_freed_memory`; every
contender runs under it, so the ratios compare the steps alone: `bench/allocator.py` measures the allocator).

    python bench/train_throughput.py --out bench/results/train_throughput.json

Scenarios: every text 77 tokens long; real roco-radiology captions; the label objective (prompts); and
clipmed's default dual model. Reports pairs/s, FLOPs per pair (training = 3 x forward, forward = 2 x
multiply-adds, counted by torch's FlopCounterMode) and MFU against the measured bf16 matmul peak.

MFU counts the model's nominal FLOPs (transformers' CLIPModel forward, what every contender is asked to
compute); clipmed skips part of them (the last layer's unread tokens), so its FLOPs executed are also
reported. The 77-token scenario also times clipmed with one of its means turned off at a time (ablations), so
each one's gain is measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (alternate, bf16_matmul_peak, clip_tokenizer_dir, machine, print_table, roco_captions,  # noqa: E402
                    synthetic_records, write_results)

BATCH = 32
CLASSES = ["Abdomen", "Chest", "Dental", "Extremity", "Head and Neck", "Pelvis", "Spine"]
LONG_CAPTION = ("Contrast-enhanced axial computed tomography of the upper abdomen demonstrates a large heterogeneous "
                "hypodense mass arising from the left hepatic lobe with peripheral nodular enhancement, compression of "
                "the adjacent stomach, several enlarged regional lymph nodes and a small amount of perihepatic ascites "
                "consistent with advanced disease")


def scenario_texts(scenario: str, rng: random.Random) -> tuple[list[str], list[str] | None]:
    """(texts, labels) of one batch: labels only for the label objective, whose texts are its prompts."""
    if scenario == "77":
        return [f"{i} {LONG_CAPTION}" for i in range(BATCH)], None
    if scenario == "labels":
        labels = [rng.choice(CLASSES) for _ in range(BATCH)]
        return [f"A medical image of {label}" for label in labels], labels
    captions = roco_captions(2000)
    return rng.sample(captions, BATCH), None


# What each ViT-B/32 ablation turns off in clipmed's step (the rest stays on): TrainConfig fields, or means the
# trainer has no option for ("fused_adamw", "pooled_last_layer", "matmul_patch_embedding").
ABLATIONS = {"sdpa attention": {"attention": "fused"}, "foreach AdamW": "fused_adamw",
             "full last layer": "pooled_last_layer", "convolution patch embedding": "matmul_patch_embedding"}


def dual_ablations(choices) -> dict[str, dict]:
    """The dual model's rows beside its machine-decided step: the step as it was before per-machine choices
    (bf16 both towers, contiguous, BatchNorm unfolded), then each choice flipped alone (TrainConfig fields)."""
    flip = {"bf16": "fp32", "fp32": "bf16"}
    return {"bf16, contiguous, BatchNorm not folded (before)": {"precision": "bf16", "memory_format": "contiguous",
                                                                "fuse_conv_bn": False},
            f"image tower {flip[choices.image_precision]}": {"image_precision": flip[choices.image_precision]},
            f"text tower {flip[choices.text_precision]}": {"text_precision": flip[choices.text_precision]},
            "channels_last" if choices.memory_format == "contiguous" else "contiguous":
                {"memory_format": "channels_last" if choices.memory_format == "contiguous" else "contiguous"},
            "BatchNorm not folded" if choices.fuse_conv_bn else "BatchNorm folded": {"fuse_conv_bn": not choices.fuse_conv_bn}}


def _conv_embeddings(embeddings, pixels):
    """transformers' CLIPVisionEmbeddings forward (the strided patch convolution): the matmul ablation's."""
    return embeddings(pixels)


def clipmed_step(model, objective: str, records, texts, labels, without: tuple[str, ...] = (), **options):
    """One step of clipmed's trainer (StepRunner + its optimizer) on a fixed batch; `options` are TrainConfig
    fields (precision, accum_steps, ...); `without` names means the trainer has no option for
    ("fused_adamw", "pooled_last_layer", "matmul_patch_embedding")."""
    from clipmed.training.config import TrainConfig
    from clipmed.training.optim import build_optimizer
    from clipmed.data.datasets import pixel_batches
    from clipmed.data.records import RecordTable
    from clipmed.objectives import TrainingRows, get_objective
    from clipmed.training.step import StepRunner

    config = TrainConfig(objective=objective, batch_size=len(records), lr_clip=1e-5, **options)
    classes = sorted(set(labels)) if labels else []
    rows = TrainingRows(RecordTable.from_records(records), list(texts), [True] * len(records), classes,
                        labels=torch.tensor([classes.index(x) for x in labels]) if labels else None)
    chosen = get_objective(objective)
    runner = StepRunner(model, chosen.loss(config, model), config)
    optimizer, _ = build_optimizer(model, config)
    if "fused_adamw" in without:
        optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                                       for g in optimizer.param_groups], betas=(0.9, 0.98), eps=1e-6, foreach=True)
    model.set_train_mode(freeze_batchnorm=True)
    paths = [r.image_path for r in records]
    batch = dataclasses.replace(chosen.batch(rows, torch.arange(len(records)), config), pixels=next(pixel_batches(
        paths, model.preprocess.size, model.preprocess.interpolation, batch_size=len(paths))))
    # Ablations of one shared ViT model set its switches before each of their steps. The pooled path also holds
    # the matmul patch embedding: without it transformers' own forward runs, convolution included.
    from clipmed.models import clip_pooling

    pooled = getattr(model, "_pooled_forward", False) and "pooled_last_layer" not in without
    matmul = clip_pooling._vision_embeddings  # each step puts it back after an ablation's step

    def step() -> None:
        if hasattr(model, "_pooled_forward"):
            model._pooled_forward = pooled
        if "matmul_patch_embedding" in without:
            clip_pooling._vision_embeddings = _conv_embeddings
        model.select_attention(runner.choices.attention)
        optimizer.zero_grad(set_to_none=True)
        try:
            runner(batch)
        finally:
            clip_pooling._vision_embeddings = matmul
        optimizer.step()
    return step


def transformers_step(config, tokenizer, pixels, texts, device: str = "cpu"):
    """The plain transformers loop: CLIPModel(..., return_loss=True) + AdamW, texts padded to 77 as
    transformers' CLIP training example does."""
    from transformers import CLIPModel

    model = CLIPModel(config).to(device).train()
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").to(device)
    pixels = pixels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                         return_loss=True).loss
        loss.backward()
        optimizer.step()
    return step


def open_clip_step(pixels, texts, device: str = "cpu"):
    """open_clip's ViT-B-32 with its ClipLoss and AdamW, as its trainer runs a step (tokens always 77)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None, output_dict=True).to(device).train()
    tokens = open_clip.tokenize(texts).to(device)
    pixels = pixels.to(device)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = model(pixels, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
    return step


def forward_flops_per_pair(encode_image, encode_text, image_size: int, text_tokens: int) -> float:
    """FLOPs of one image + one text forward (2 x multiply-adds) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = {"input_ids": torch.full((1, text_tokens), 400), "attention_mask": torch.ones(1, text_tokens, dtype=torch.long)}
    pixels = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encode_image(pixels)
        encode_text(tokens)
    return float(counter.get_total_flops())


def profile_step(step, top: int = 12) -> list[dict]:
    """Where one step spends its CPU time: the ops with the most self time (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    averages = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in averages)
    averages.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms": e.self_cpu_time_total / 1e3,
             "calls": e.count} for e in averages[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scenarios", default="77,captions,labels,dual")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one clipmed step of the 77-token and dual scenarios (torch.profiler)")
    args = parser.parse_args()
    from clipmed.processes import keep_freed_memory

    kept = keep_freed_memory()  # the trainer's allocator, for every contender alike

    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clipmed.data.datasets import pixel_batches
    from clipmed.machine import Speed, attention_for, facts, resolve
    from clipmed.models import HFCLIP, load_model

    torch.manual_seed(0)
    rng = random.Random(0)
    peak = bf16_matmul_peak()
    tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer_dir())
    vit_b32 = CLIPConfig()  # transformers' defaults are ViT-B/32 with CLIP's 77-token text tower
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    records = synthetic_records(BATCH)
    # One untouched model: the contenders' normalised pixels and the nominal FLOPs (the standard forward every
    # contender is asked for).
    reference = HFCLIP(CLIPModel(vit_b32).eval(), processor, source="bench")
    pixels = reference.normalize_pixels(next(pixel_batches([r.image_path for r in records], 224, "bicubic",
                                                           batch_size=len(records))))
    nominal_vit_b32 = 3 * forward_flops_per_pair(
        lambda x: reference.model.get_image_features(pixel_values=x),
        lambda t: reference.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]),
        224, 77)
    del reference

    results = {"machine": machine(), "batch": BATCH, "scenarios": {},
               "allocator": "freed memory kept (clipmed's default)" if kept else "glibc default (mallopt unavailable)",
               "clipmed_means": ["eager attention on CPU", "fused AdamW", "pooled-token last layer",
                                 "matmul patch embedding", "length-grouped text padding",
                                 "one encode per distinct prompt"]}
    for scenario in args.scenarios.split(","):
        texts, labels = scenario_texts("captions" if scenario == "dual" else scenario, rng)
        objective = "label" if labels else "caption"
        if scenario == "dual":
            # One model per contender: each holds its own memory format.
            model = load_model("dual:efficientnet-lite0+minilm")
            choices = resolve(Speed(), facts("cpu"))[0]
            results["dual_choices"] = choices.to_dict()
            contenders = {"clipmed": clipmed_step(model, objective, records, texts, labels)}
            for name, options in dual_ablations(choices).items():
                contenders[f"clipmed, {name}"] = clipmed_step(load_model("dual:efficientnet-lite0+minilm"), objective,
                                                              records, texts, labels, **options)
            text_tokens = model.tokenize(texts)["input_ids"].shape[1]
            nominal = executed = 3 * forward_flops_per_pair(model.encode_image, model.encode_text, 224, text_tokens)
        else:
            model = HFCLIP(CLIPModel(vit_b32), processor, source="bench")
            # Every ViT-B/32 contender runs bf16 autocast: the same work.
            contenders = {"clipmed": clipmed_step(model, objective, records, texts, labels, precision="bf16"),
                          "transformers": transformers_step(vit_b32, tokenizer, pixels, texts),
                          "open_clip": open_clip_step(pixels, texts)}
            if scenario == "77":
                for name, switch in ABLATIONS.items():
                    options = switch if isinstance(switch, dict) else {}
                    without = () if isinstance(switch, dict) else (switch,)
                    contenders[f"clipmed, {name}"] = clipmed_step(model, objective, records, texts, labels,
                                                                  without=without, precision="bf16", **options)
            model.select_attention(attention_for("cpu"))
            nominal, text_tokens = nominal_vit_b32, 77
            # Executed FLOPs are comparable only where clipmed encodes the same texts (77 tokens each); with
            # captions and prompts it also skips padding and repeats, and nominal MFU can pass 100%.
            executed = (3 * forward_flops_per_pair(model.encode_image, model.encode_text, 224, text_tokens)
                        if scenario == "77" else None)
        seconds = alternate(contenders, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
        if args.profile and scenario in ("77", "dual"):
            results[f"profile_{scenario}_clipmed"] = profile_step(contenders["clipmed"])
            for row in results[f"profile_{scenario}_clipmed"]:
                print(f"{100 * row['share']:5.1f}%  {row['ms']:8.1f} ms  {row['calls']:5d}  {row['op']}")
        entry = {name: {"pairs_per_s": BATCH / s, "seconds_per_step": s, "flops": nominal}
                 for name, s in seconds.items()}
        entry[f"train_flops_per_pair_at_{text_tokens}_tokens"] = nominal
        if executed is not None:
            entry["clipmed"]["flops_executed"] = executed
            entry["clipmed_executed_train_flops_per_pair"] = executed
        results["scenarios"][scenario] = entry
        del contenders, model
    results["load_average_after"] = os.getloadavg()

    # The peak again after the runs: a shared machine can be slow at any one moment; MFU uses the higher.
    results["bf16_peak_tflops_before_after"] = [peak / 1e12, bf16_matmul_peak() / 1e12]
    peak = max(results["bf16_peak_tflops_before_after"]) * 1e12
    results["bf16_peak_tflops"] = peak / 1e12
    for entry in results["scenarios"].values():
        for value in entry.values():
            if isinstance(value, dict):
                value["mfu_bf16"] = value["pairs_per_s"] * value.pop("flops") / peak
                if "flops_executed" in value:
                    value["mfu_bf16_executed"] = value["pairs_per_s"] * value.pop("flops_executed") / peak
    s = results["scenarios"]
    for key in ("77", "captions", "labels"):
        if key in s:
            results[f"ratio_vs_open_clip_{key}"] = s[key]["clipmed"]["pairs_per_s"] / s[key]["open_clip"]["pairs_per_s"]
    if "77" in s:
        results["mfu_bf16"] = s["77"]["clipmed"]["mfu_bf16"]
        results["mfu_bf16_executed"] = s["77"]["clipmed"]["mfu_bf16_executed"]
        results["open_clip_mfu_bf16"] = s["77"]["open_clip"]["mfu_bf16"]
    print(f"bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s, {torch.get_num_threads()} threads, batch {BATCH}")
    print("MFU % from the nominal FLOPs of the standard forward (77-token texts, one per image); above 100% where "
          "clipmed skips padding or repeated prompts")
    rows = []
    for scenario, entry in s.items():
        for name, value in entry.items():
            if isinstance(value, dict):
                ratio = entry["open_clip"]["seconds_per_step"] / value["seconds_per_step"] if "open_clip" in entry else float("nan")
                rows.append([scenario, name, f"{value['pairs_per_s']:.1f}", f"{ratio:.2f}", f"{100 * value['mfu_bf16']:.1f}"])
    print_table(["scenario", "contender", "pairs/s", "vs open_clip", "MFU %"], rows)
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
