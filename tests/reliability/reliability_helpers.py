"""Shared helpers of the reliability tests: the `clipmed` command in a subprocess, run folders, malicious pickles.

Subprocesses run single-threaded (OMP_NUM_THREADS=1): CPU kernels then reduce in one fixed order, so two
processes with the same inputs produce bitwise-identical weights, and the tests stay light on a shared machine.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# metrics.csv columns that a resumed run must reproduce exactly (pairs_per_s and elapsed_s are wall-clock).
EXACT_COLUMNS = ("step", "epoch", "loss", "lr", "logit_scale")
TIMEOUT = 240


def train_options(epochs: int = 3) -> list[str]:
    """The options of every training run here (tiny random towers: let BatchNorm statistics adapt)."""
    return ["--batch-size", "8", "--epochs", str(epochs), "--checkpoint-every", "2", "--precision", "fp32",
            "--update-batchnorm", "--lr-new", "3e-3", "--lr-pretrained", "3e-3", "--seed", "0"]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipmed.cli", *args]


def run_clipmed(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def start_clipmed(*args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    try:
        return subprocess.Popen(command(*args), env=ENV, stdout=handle, stderr=subprocess.STDOUT)
    finally:
        handle.close()  # the child keeps its own descriptor


def train_args(prepared: Path, model: Path, out: Path) -> list[str]:
    return ["train", "--data", str(prepared), "--model", str(model), "--out", str(out), *train_options()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metric_rows(run: Path) -> list[tuple[str, ...]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [tuple(row[c] for c in EXACT_COLUMNS) for row in csv.DictReader(handle)]


def checkpoint_files(run: Path) -> list[Path]:
    """Every file named like a checkpoint (temporaries of atomic writes are named .last.pt.*.tmp, not *.pt)."""
    return sorted(p for p in run.rglob("*.pt") if p.is_file())


def load_every_checkpoint(run: Path) -> dict[Path, dict]:
    """Load each checkpoint file the way `--resume` does; any partial file fails here."""
    return {path: torch.load(path, map_location="cpu", weights_only=True) for path in checkpoint_files(run)}


def stale_temporaries(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob(".*.tmp"))


def checkpoint_step(path: Path, seen: dict) -> int | None:
    """The step of the checkpoint at `path` when it changed since last call (None when absent or unchanged)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if seen.get("key") == key:
        return seen.get("step")
    state = torch.load(path, map_location="cpu", weights_only=True)  # a partial file would fail here
    seen.update(key=key, step=int(state["step"]))
    return seen["step"]


def last_logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0


def wait_for_checkpoint(process: subprocess.Popen, run: Path, at_least: int, log: Path,
                        timeout: float = TIMEOUT) -> int:
    """Poll until `run` has a checkpoint of step >= at_least; return its step. Fails if the process ends first."""
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # metrics.csv (tiny, rewritten at every checkpoint) says when last.pt is worth loading: loading a
        # checkpoint at every poll would take CPU from the run being watched.
        logged = last_logged_step(run)
        step = checkpoint_step(run / "checkpoints" / "last.pt", seen) if logged >= at_least - 2 else None
        if step is not None and step >= at_least:
            return step
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before a checkpoint of step {at_least}:\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step {at_least} after {timeout} s")


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()  # SIGKILL: no handler, no cleanup, no flush
    process.wait(timeout=30)


class Payload:
    """A pickle that, when unpickled by a plain pickle.load / torch.load(weights_only=False), creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_malicious_checkpoint(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    """A file that looks like a torch checkpoint (zip, tensors) but runs os.mkdir(marker) when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(tensors or {"weight": torch.zeros(2)}), "payload": Payload(marker)}, path)
    return path


def error_line(capsys) -> str:
    """The one error line on stderr (progress bars aside); fails on a traceback or a multi-line message."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("clipmed:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("clipmed: error: ")
    return errors[0]


def single_thread():
    """Context for in-process training: one intra-op thread, as the subprocesses (fast on a busy machine)."""
    from contextlib import contextmanager

    @contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()
