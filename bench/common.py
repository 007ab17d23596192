"""Shared pieces of the benchmarks: the machine's bf16 peak, a CLIP tokenizer built offline, synthetic
records, timing that alternates contenders, and the JSON + table output."""

from __future__ import annotations

import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ROCO = REPO.parent / "shared" / "datasets" / "roco-radiology"


# Square products and ViT-B/32's own (patch tokens x width x MLP width): the best of these is the denominator.
PEAK_SHAPES = ((2048, 2048, 2048), (3072, 3072, 3072), (4096, 4096, 4096), (1600, 768, 3072), (1600, 3072, 768))


def bf16_matmul_peak(shapes=PEAK_SHAPES, repeats: int = 10, device: str = "cpu") -> float:
    """Measured bf16 matmul throughput in FLOP/s (2 m k n per product), best over `shapes` and `repeats`: the
    MFU denominator. A single shape timed once can land on a slow moment of a shared machine; the benchmarks
    measure it before and after their runs and keep the higher."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
        a @ b
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def synchronize(device: str) -> None:
    """Wait for a GPU's queued work (timing on a GPU without it measures the launch, not the work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clip_tokenizer_dir() -> str:
    """A transformers CLIP tokenizer folder built from the BPE vocabulary open_clip ships (no download):
    the same byte-level BPE as openai/clip-vit-base-patch32."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    pairs = [tuple(merge.split()) for merge in merges]
    CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=pairs).save_pretrained(str(folder))
    return str(folder)


def synthetic_records(n: int, size: int = 256, seed: int = 0):
    """n Records with random RGB images on disk (speed does not depend on the pixels)."""
    from clipmed.data.records import Record

    folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        records.append(Record(id=f"r{i}", image_path=str(path), caption=None))
    return records


def synthetic_imagefolder(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """An imagefolder dataset (metadata.jsonl + images/ inside root) of n random images with captions and 3
    labels, for benchmarks that run the whole trainer (speed does not depend on the pixels)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = ("Chest", "Head", "Abdomen")
    with open(root / "metadata.jsonl", "w") as handle:
        for i in range(n):
            name = f"images/{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
            handle.write(json.dumps({"file_name": name, "id": f"row{i}", "article": f"a{i // 2}",
                                     "caption": f"Radiograph {i} of the {classes[i % 3].lower()} showing a mass.",
                                     "body_part": classes[i % 3]}) + "\n")
    return root


def roco_captions(n: int) -> list[str]:
    """Real captions (roco-radiology) in file order; falls back to synthetic ones when the data is absent."""
    path = ROCO / "metadata.jsonl"
    if not path.exists():
        return [f"Axial CT image {i} of the abdomen showing a hypodense lesion in the liver" for i in range(n)]
    lines = path.read_text().splitlines()
    return [json.loads(line)["caption"] for line in lines[:n]]


def alternate(contenders: dict[str, Callable[[], None]], *, warmup: int, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each contender, timed in alternating rounds so that drift in the machine's
    speed hits every contender alike."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict:
    """The machine a benchmark ran on: CPU model (as lscpu names it), the flags clipmed's rules read, and the
    load average when it started (a shared machine's other work slows every contender)."""
    from clipmed.machine import facts

    described = facts("cpu").to_dict()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": described["cpu_model"], "cpu_flags": described["cpu_flags"],
            "cpu_capability": described["cpu_capability"], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}


def write_results(path: str | None, results: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
