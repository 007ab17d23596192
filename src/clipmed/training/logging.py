"""Training logs: metrics.csv and validation.csv always, TensorBoard and Weights & Biases when asked.

The CSV files are rewritten atomically at every `flush()` (the loop calls it with every checkpoint), so on
disk they always match a checkpoint; a run resumed from step S drops the rows logged after S by the
interrupted run and appends the replayed steps, as if it had never stopped. TensorBoard gets the same
guarantee from `purge_step`: events after S are hidden when the run resumes.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ClipmedError
from ..io import write_text_atomic

METRICS_CSV = "metrics.csv"
VALIDATION_CSV = "validation.csv"
METRICS_COLUMNS = ["step", "epoch", "loss", "lr", "logit_scale", "pairs_per_s", "elapsed_s", "data_wait_s"]
VALIDATION_COLUMNS = ["step", "name", "value"]
TENSORBOARD_DIR = "tensorboard"
WANDB_ID = "wandb-id.txt"
REPORTERS = ("tensorboard", "wandb")


class _Table:
    """A CSV file held in memory and rewritten whole, atomically; rows are lists of strings."""

    def __init__(self, path: Path, columns: list[str], keep_until: int) -> None:
        self.path, self.columns = path, columns
        self.rows = self._read(keep_until) if path.exists() else []

    def _read(self, keep_until: int) -> list[list[str]]:
        with open(self.path, newline="") as handle:
            reader = csv.reader(handle)
            next(reader, None)
            return [row for row in reader if int(row[0]) <= keep_until]

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue())


class RunLogger:
    """Everything a training run logs, in one place: call `step()` once per step and `validation()` per score.

    `run` is the run folder; `start_step` the step training starts from (0, or the checkpoint's step on
    resume); `report_to` any of "tensorboard" (event files in RUN/tensorboard) and "wandb" (project
    `wandb_project`, with `config` as the run config). Use as a context manager, or call `close()`.
    """

    def __init__(self, run: str | os.PathLike, *, start_step: int = 0, report_to: Sequence[str] = (),
                 config: dict | None = None, wandb_project: str = "clipmed") -> None:
        unknown = sorted(set(report_to) - set(REPORTERS))
        if unknown:
            raise ClipmedError(f"unknown --report-to {', '.join(unknown)}: use any of {', '.join(REPORTERS)}")
        self.run = Path(run)
        self.metrics = _Table(self.run / METRICS_CSV, METRICS_COLUMNS, start_step)
        self.scores = _Table(self.run / VALIDATION_CSV, VALIDATION_COLUMNS, start_step)
        self.tensorboard = _tensorboard(self.run, start_step) if "tensorboard" in report_to else None
        self.wandb = _wandb(self.run, start_step, config, wandb_project) if "wandb" in report_to else None

    def step(self, step: int, epoch: int, loss: float, lr: float, logit_scale: float, pairs_per_s: float,
             elapsed: float, data_wait: float = 0.0) -> None:
        """One optimisation step; `logit_scale` is the model's parameter (log of the inverse temperature);
        `data_wait` the seconds the step waited for its images (loading is the bottleneck when it is large)."""
        self.metrics.rows.append([str(step), str(epoch), f"{loss:.6f}", f"{lr:.3e}", f"{logit_scale:.5f}",
                                  f"{pairs_per_s:.2f}", f"{elapsed:.1f}", f"{data_wait:.4f}"])
        self._scalars(step, {"train/loss": loss, "train/lr": lr, "train/logit_scale": logit_scale,
                             "train/pairs_per_s": pairs_per_s, "train/epoch": epoch})

    def validation(self, step: int, name: str, value: float) -> None:
        """A validation score (e.g. val_mean_recall_at_1) measured after `step`."""
        self.scores.rows.append([str(step), name, f"{value:.6f}"])
        self._scalars(step, {f"validation/{name}": value})

    def flush(self) -> None:
        """Write the CSV files (atomically) and push buffered events; call it with every checkpoint."""
        self.metrics.write()
        self.scores.write()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Flush, then close the TensorBoard writer and finish the W&B run."""
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)


def _tensorboard(run: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ClipmedError("--report-to tensorboard needs the tensorboard package: "
                           "pip install 'clipmed[tensorboard]'") from None
    # purge_step: TensorBoard hides the interrupted run's events from start_step + 1 on; they are replayed.
    return SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=start_step + 1)


def _wandb(run: Path, start_step: int, config: dict | None, project: str) -> Any:
    try:
        import wandb
    except ImportError:
        raise ClipmedError("--report-to wandb needs the wandb package: pip install 'clipmed[wandb]', "
                           "then `wandb login` (or WANDB_MODE=offline)") from None
    # One W&B run per run folder: its id is kept beside the run so that a resumed run continues it. W&B
    # ignores steps it has already seen, so the steps replayed after a resume keep their first values there.
    id_file = run / WANDB_ID
    if start_step and id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = wandb.util.generate_id()
        write_text_atomic(id_file, run_id + "\n")
    return wandb.init(project=project, name=run.name, id=run_id, resume="allow", dir=str(run), config=config)
