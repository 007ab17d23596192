"""Training throughput, side by side in one run: clipmed's trainer vs a plain transformers CLIPModel loop vs
open_clip's ViT-B-32 with its ClipLoss, on the same work (random ViT-B/32 weights: speed does not depend on
them; batch 32; bf16 autocast; AdamW step included; same thread count), contenders alternating.

    python bench/train_throughput.py --out bench/results/train_throughput.json

Scenarios: every text 77 tokens long; real roco-radiology captions; the label objective (prompts); and
clipmed's default dual model. Reports pairs/s, FLOPs per pair (training = 3 x forward, forward = 2 x
multiply-adds, counted by torch's FlopCounterMode) and MFU against the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
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


def clipmed_step(model, objective: str, records, texts, labels, **options):
    """One step of clipmed's trainer (StepRunner + its optimizer) on a fixed batch; `options` are TrainConfig
    fields (accum_steps, ...)."""
    from clipmed.training.config import TrainConfig
    from clipmed.training.optim import build_optimizer
    from clipmed.training.step import StepRunner, make_batch
    from clipmed.training.train import TrainingRows, build_loss

    config = TrainConfig(objective=objective, batch_size=len(records), precision="bf16", lr_clip=1e-5, **options)
    classes = sorted(set(labels)) if labels else []
    rows = TrainingRows(list(records), list(texts), [True] * len(records), classes,
                        labels=torch.tensor([classes.index(x) for x in labels]) if labels else None)
    runner = StepRunner(model, build_loss(config), config)
    optimizer, _ = build_optimizer(model, config)
    model.set_train_mode(freeze_batchnorm=True)
    batch = make_batch(rows, torch.arange(len(records)), config)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        runner(batch)
        optimizer.step()
    return step


def transformers_step(config, tokenizer, pixels, texts):
    """The plain transformers loop: CLIPModel(..., return_loss=True) + AdamW, texts padded to 77 as
    transformers' CLIP training example does."""
    from transformers import CLIPModel

    model = CLIPModel(config).train()
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                         return_loss=True).loss
        loss.backward()
        optimizer.step()
    return step


def open_clip_step(pixels, texts):
    """open_clip's ViT-B-32 with its ClipLoss and AdamW, as its trainer runs a step (tokens always 77)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None, output_dict=True).train()
    tokens = open_clip.tokenize(texts)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixels, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
    return step


def forward_flops_per_pair(model, text_tokens: int) -> float:
    """FLOPs of one image + one text forward (2 x multiply-adds) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = {"input_ids": torch.full((1, text_tokens), 400), "attention_mask": torch.ones(1, text_tokens, dtype=torch.long)}
    pixels = torch.zeros(1, 3, model.preprocess.size, model.preprocess.size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.encode_image(pixels)
        model.encode_text(tokens)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scenarios", default="77,captions,labels,dual")
    args = parser.parse_args()

    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clipmed.data.datasets import IMAGE_CACHE, stack_images
    from clipmed.models import HFCLIP, load_model

    torch.manual_seed(0)
    rng = random.Random(0)
    peak = bf16_matmul_peak()
    tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer_dir())
    vit_b32 = CLIPConfig()  # transformers' defaults are ViT-B/32 with CLIP's 77-token text tower
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    records = synthetic_records(BATCH)
    IMAGE_CACHE.warm([r.image_path for r in records], 224)
    pixels = HFCLIP(CLIPModel(vit_b32), processor, source="bench").normalize_pixels(stack_images(records, 224))

    results = {"machine": machine(), "batch": BATCH, "bf16_peak_tflops": peak / 1e12, "scenarios": {}}
    rows = []
    for scenario in args.scenarios.split(","):
        texts, labels = scenario_texts("captions" if scenario == "dual" else scenario, rng)
        objective = "label" if labels else "caption"
        if scenario == "dual":
            model = load_model("dual:efficientnet-lite0+minilm")
            contenders = {"clipmed": clipmed_step(model, objective, records, texts, labels)}
            flops_model, text_tokens = model, model.tokenize(texts)["input_ids"].shape[1]
        else:
            clipmed_model = HFCLIP(CLIPModel(vit_b32), processor, source="bench")
            contenders = {"clipmed": clipmed_step(clipmed_model, objective, records, texts, labels),
                          "transformers": transformers_step(vit_b32, tokenizer, pixels, texts),
                          "open_clip": open_clip_step(pixels, texts)}
            flops_model, text_tokens = clipmed_model, 77
        seconds = alternate(contenders, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
        train_flops = 3 * forward_flops_per_pair(flops_model, text_tokens)
        entry = {name: {"pairs_per_s": BATCH / s, "seconds_per_step": s,
                        "mfu_bf16": BATCH * train_flops / s / peak} for name, s in seconds.items()}
        entry["train_flops_per_pair_at_%d_tokens" % text_tokens] = train_flops
        results["scenarios"][scenario] = entry
        for name, s in seconds.items():
            ratio = seconds["open_clip"] / s if "open_clip" in seconds else float("nan")
            rows.append([scenario, name, f"{BATCH / s:.1f}", f"{ratio:.2f}", f"{100 * entry[name]['mfu_bf16']:.1f}"])
        del contenders

    s = results["scenarios"]
    for key, scenario in (("77", "77"), ("captions", "captions"), ("labels", "labels")):
        if scenario in s:
            results[f"ratio_vs_open_clip_{key}"] = s[scenario]["clipmed"]["pairs_per_s"] / s[scenario]["open_clip"]["pairs_per_s"]
    if "77" in s:
        results["mfu_bf16"] = s["77"]["clipmed"]["mfu_bf16"]
    print(f"bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s, {torch.get_num_threads()} threads, batch {BATCH}")
    print_table(["scenario", "contender", "pairs/s", "vs open_clip", "MFU %"], rows)
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
