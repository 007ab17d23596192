"""bench/train_throughput.py's clipmed step (also timed by bench/gpu.py and bench/memory_and_cache.py): it must
keep running against the trainer's current data types, and train."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import tiny_dual, write_synthetic_imagefolder

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_benchmarks_clipmed_step_trains_the_model(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from train_throughput import clipmed_step
    finally:
        sys.path.remove(str(BENCH))
    from clipmed.data.sources import load_source

    records = list(load_source(str(write_synthetic_imagefolder(tmp_path / "data", per_class=2, unlabeled=0))).records)[:4]
    model = tiny_dual()
    before = model.image_projection.weight.detach().clone()
    step = clipmed_step(model, "caption", records, [f"caption {i}" for i in range(4)], None, precision="fp32")
    step()
    assert not torch.equal(before, model.image_projection.weight)
