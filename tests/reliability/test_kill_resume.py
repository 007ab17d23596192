"""Kill -9 and resume: `clipmed train` killed at any moment and resumed ends bitwise where an uninterrupted run
ends, and no checkpoint on disk is ever partial.

Every run here is a real `python -m clipmed.cli train` subprocess, killed with SIGKILL (no handler runs, nothing
is flushed), on a synthetic dataset with enough steps per epoch that a kill right after a mid-epoch checkpoint
lands mid-epoch.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from clipmed.data.records import FieldMap
from clipmed.data.split import prepare, read_manifest
from helpers import write_synthetic_imagefolder
from reliability_helpers import (assert_same_weights, checkpoint_files, kill, last_logged_step, load_every_checkpoint,
                                 metric_rows, run_clipmed, stale_temporaries, start_clipmed, train_args,
                                 wait_for_checkpoint)

BATCH, EPOCHS = 8, 3


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    """About 20 steps per epoch at batch 8 (the caption pool of 64 rows per class)."""
    root = write_synthetic_imagefolder(tmp_path_factory.mktemp("kill_data"), per_class=64, unlabeled=12, seed=1)
    out = tmp_path_factory.mktemp("kill_prepared")
    prepare(str(root), out, fields=FieldMap(group_field="article"), min_class_count=5, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def steps_per_epoch(kill_data) -> int:
    pool = read_manifest(kill_data)["splits"]["pool"]
    return len(pool) // BATCH


@pytest.fixture(scope="module")
def reference(kill_data, tiny_dual_folder, tmp_path_factory):
    """An uninterrupted run, started in the background so that it overlaps the first kill test."""
    root = tmp_path_factory.mktemp("reference")
    process = start_clipmed(*train_args(kill_data, tiny_dual_folder, root / "run"), log=root / "log.txt")
    finished: dict = {}

    def wait() -> Path:
        if not finished:
            process.wait(timeout=300)
            assert process.returncode == 0, (root / "log.txt").read_text()[-3000:]
            finished["run"] = root / "run"
        return finished["run"]

    yield wait
    kill(process)


def _resume(run: Path) -> subprocess.CompletedProcess:
    done = run_clipmed("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_run(run: Path, reference: Path) -> None:
    assert_same_weights(run, reference)
    assert metric_rows(run) == metric_rows(reference)
    info, expected = (json.loads((r / "run.json").read_text()) for r in (run, reference))
    assert info["status"] == "done" and info["best"] == expected["best"] and info["steps"] == expected["steps"]


def test_kill_mid_epoch_then_resume_is_bitwise_identical(kill_data, tiny_dual_folder, steps_per_epoch, reference,
                                                         tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    target = steps_per_epoch + 2  # the first mid-epoch checkpoint of the second epoch (the first saved model/)
    process = start_clipmed(*train_args(kill_data, tiny_dual_folder, run), log=log)
    try:
        step = wait_for_checkpoint(process, run, target, log)
        # Not inside the write of metrics.csv that follows last.pt (a separate test covers that window).
        while last_logged_step(run) < step and process.poll() is None:
            time.sleep(0.002)
    finally:
        kill(process)
    assert process.returncode == -9

    # No checkpoint on disk is partial, and the one resume starts from is mid-epoch.
    states = load_every_checkpoint(run)
    assert list(states) == [run / "checkpoints" / "last.pt"]
    step = states[run / "checkpoints" / "last.pt"]["step"]
    assert target <= step < EPOCHS * steps_per_epoch and step % steps_per_epoch != 0, step
    assert json.loads((run / "run.json").read_text())["status"] == "running"

    # What a kill during torch.save leaves behind: the temporary of the atomic write, half written.
    stale = run / "checkpoints" / ".last.pt.k1ll3d9x.tmp"
    stale.write_bytes((run / "checkpoints" / "last.pt").read_bytes()[:4096])

    _resume(run)
    assert not stale_temporaries(run), "resume leaves temporaries of interrupted writes"
    assert checkpoint_files(run) == [run / "checkpoints" / "last.pt"]
    _assert_same_run(run, reference())


def test_repeated_kills_at_random_moments_still_give_identical_weights(kill_data, tiny_dual_folder, steps_per_epoch,
                                                                       reference, tmp_path):
    rng = random.Random(20240611)  # fixed: a failure reproduces with the same kill delays
    run, log = tmp_path / "run", tmp_path / "log.txt"
    total = EPOCHS * steps_per_epoch
    resumed_from = 0
    kills = 0
    for attempt in range(3):
        args = train_args(kill_data, tiny_dual_folder, run) if attempt == 0 else ["train", "--resume", str(run)]
        process = start_clipmed(*args, log=log)
        try:
            # Kill at a random moment after the run made progress: during a step, a checkpoint write, a
            # validation, or the swap of model/ at an epoch end.
            wait_for_checkpoint(process, run, min(resumed_from + 2, total - 2), log)
            try:
                process.wait(timeout=rng.uniform(0.0, 0.6))
            except subprocess.TimeoutExpired:
                pass
        finally:
            kill(process)
        if process.returncode == 0:
            break  # finished before the kill came
        assert process.returncode == -9, log.read_text()[-3000:]  # killed, not crashed
        kills += 1
        states = load_every_checkpoint(run)  # every checkpoint on disk loads, whenever the kill came
        resumed_from = states[run / "checkpoints" / "last.pt"]["step"]
        assert last_logged_step(run) >= resumed_from  # the logs are written before the checkpoint
    assert kills >= 2
    _resume(run)
    assert not stale_temporaries(run)
    _assert_same_run(run, reference())


def test_a_kill_right_after_a_checkpoint_write_loses_no_metrics_rows(prepared_synthetic, tiny_dual_folder, tmp_path,
                                                                      monkeypatch):
    """Deterministic version of the narrowest window: killed right after last.pt was replaced. If metrics.csv is
    written after last.pt, the resumed run starts after rows that metrics.csv never received."""
    from clipmed.training import train as train_module
    from clipmed.training.config import TrainConfig
    from reliability_helpers import single_thread

    def config(out: Path) -> TrainConfig:
        return TrainConfig(data=str(prepared_synthetic), model=str(tiny_dual_folder), out=str(out), epochs=2,
                           batch_size=8, lr_pretrained=3e-3, lr_new=3e-3, checkpoint_every=2, precision="fp32",
                           freeze_batchnorm=False)

    real_save, calls = train_module.save_checkpoint, {"n": 0}

    def killed_after_second_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # last.pt of step 4 is on disk; nothing after it ran
            raise KeyboardInterrupt

    with single_thread():
        reference = train_module.train(config(tmp_path / "reference"), progress=False)
        monkeypatch.setattr(train_module, "save_checkpoint", killed_after_second_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(config(tmp_path / "run"), progress=False)
        monkeypatch.setattr(train_module, "save_checkpoint", real_save)
        resumed = train_module.train(TrainConfig(out=str(tmp_path / "run")), resume=True, progress=False)
    assert metric_rows(resumed) == metric_rows(reference)
    assert_same_weights(resumed, reference)


def test_resume_removes_temporaries_of_interrupted_run_folder_writes(prepared_synthetic, tiny_dual_folder, tmp_path):
    from clipmed.training.config import TrainConfig
    from clipmed.training.train import train
    from reliability_helpers import single_thread

    run = tmp_path / "run"
    with single_thread():
        train(TrainConfig(data=str(prepared_synthetic), model=str(tiny_dual_folder), out=str(run), epochs=1,
                          max_steps=2, batch_size=8, precision="fp32"), progress=False)
        stale = [run / ".metrics.csv.q1w2e3r4.tmp", run / ".run.json.a5s6d7f8.tmp",
                 run / ".validation.csv.1a2b3c4d.tmp", run / "checkpoints" / ".last.pt.z9x8c7v6.tmp"]
        for path in stale:
            path.write_bytes(b"half a file")
        train(TrainConfig(out=str(run)), resume=True, progress=False)
    assert [p for p in stale if p.exists()] == []


def test_augmented_run_with_loader_workers_resumes_bitwise(prepared_synthetic, tiny_dual_folder, tmp_path, monkeypatch):
    """--augment draws each row's augmentation from (seed, epoch, row): a run read by two loader workers, killed
    after a mid-epoch checkpoint (one that follows a --val-every validation) and resumed, ends bitwise where an
    uninterrupted run read in the main process ends."""
    from clipmed.training import train as train_module
    from clipmed.training.config import TrainConfig
    from reliability_helpers import single_thread

    def config(out: Path, workers: int) -> TrainConfig:
        return TrainConfig(data=str(prepared_synthetic), model=str(tiny_dual_folder), out=str(out), epochs=2,
                           batch_size=8, lr_pretrained=3e-3, lr_new=3e-3, checkpoint_every=4, precision="fp32",
                           freeze_batchnorm=False, augment=True, aug_scale=(0.5, 1.0), aug_hflip=True, val_every=3,
                           val_max_rows=6, loader_workers=workers)

    real_save, calls = train_module.save_checkpoint, {"n": 0}

    def killed_after_second_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with single_thread():
        reference = train_module.train(config(tmp_path / "reference", 0), progress=False)
        monkeypatch.setattr(train_module, "save_checkpoint", killed_after_second_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(config(tmp_path / "run", 2), progress=False)
        monkeypatch.setattr(train_module, "save_checkpoint", real_save)
        resumed = train_module.train(TrainConfig(out=str(tmp_path / "run")), resume=True, progress=False)
    assert metric_rows(resumed) == metric_rows(reference)
    assert (resumed / "validation.csv").read_text() == (reference / "validation.csv").read_text()
    assert_same_weights(resumed, reference)
