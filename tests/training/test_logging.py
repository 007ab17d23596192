"""RunLogger: metrics.csv / validation.csv always, TensorBoard events and W&B when asked, resume-exact."""

from __future__ import annotations

import csv
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipmed.errors import ClipmedError
from clipmed.training.logging import METRICS_COLUMNS, RunLogger


def _log_steps(logger: RunLogger, steps: range, loss_offset: float = 0.0) -> None:
    for step in steps:
        logger.step(step, epoch=(step - 1) // 3, loss=2.0 - 0.1 * step + loss_offset, lr=1e-4 * step,
                    logit_scale=2.65926, pairs_per_s=31.25, elapsed=0.5 * step, data_wait=0.01 * step)
        if step % 3 == 0:
            logger.validation(step, "val_mean_recall_at_1", 0.1 * step)


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _scalars(run, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, round(e.value, 5)) for e in events.Scalars(tag)]


def test_csv_files_hold_one_row_per_step_and_per_score(tmp_path):
    with RunLogger(tmp_path) as logger:
        _log_steps(logger, range(1, 7))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRICS_COLUMNS)
    assert lines[1] == "1,0,1.900000,1.000e-04,2.65926,31.25,0.5,0.0100"
    assert len(lines) == 7
    assert _rows(tmp_path / "validation.csv") == [
        {"step": "3", "name": "val_mean_recall_at_1", "value": "0.300000"},
        {"step": "6", "name": "val_mean_recall_at_1", "value": "0.600000"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "validation.csv"]  # no temporary files


def test_nothing_reaches_disk_before_a_flush(tmp_path):
    logger = RunLogger(tmp_path)
    _log_steps(logger, range(1, 3))
    assert not (tmp_path / "metrics.csv").exists()
    logger.flush()
    assert len(_rows(tmp_path / "metrics.csv")) == 2


def test_a_resumed_run_replaces_the_rows_after_its_checkpoint(tmp_path):
    logger = RunLogger(tmp_path)
    _log_steps(logger, range(1, 8))
    logger.flush()  # as if the run crashed at step 7 after a flush, and its checkpoint is at step 4
    with RunLogger(tmp_path, start_step=4) as resumed:
        _log_steps(resumed, range(5, 8), loss_offset=1.0)
    losses = [(int(r["step"]), float(r["loss"])) for r in _rows(tmp_path / "metrics.csv")]
    assert losses == [(1, 1.9), (2, 1.8), (3, 1.7), (4, 1.6), (5, 2.5), (6, 2.4), (7, 2.3)]
    assert [r["step"] for r in _rows(tmp_path / "validation.csv")] == ["3", "6"]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    with RunLogger(tmp_path, report_to=("tensorboard",)) as logger:
        _log_steps(logger, range(1, 7))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert _scalars(tmp_path, "train/loss") == [(s, round(2.0 - 0.1 * s, 5)) for s in range(1, 7)]
    assert _scalars(tmp_path, "train/lr")[-1] == (6, 6e-4)
    assert _scalars(tmp_path, "validation/val_mean_recall_at_1") == [(3, 0.3), (6, 0.6)]
    for tag in ("train/logit_scale", "train/pairs_per_s", "train/epoch"):
        assert len(_scalars(tmp_path, tag)) == 6
    assert (tmp_path / "metrics.csv").exists()  # the CSV is kept whatever else is reported


def test_tensorboard_hides_the_steps_a_resumed_run_replays(tmp_path):
    with RunLogger(tmp_path, report_to=("tensorboard",)) as logger:
        _log_steps(logger, range(1, 8))
    with RunLogger(tmp_path, start_step=4, report_to=("tensorboard",)) as resumed:
        _log_steps(resumed, range(5, 8), loss_offset=1.0)
    assert _scalars(tmp_path, "train/loss") == [(1, 1.9), (2, 1.8), (3, 1.7), (4, 1.6), (5, 2.5), (6, 2.4), (7, 2.3)]


def test_unknown_reporter_is_a_user_error(tmp_path):
    with pytest.raises(ClipmedError, match="unknown --report-to mlflow"):
        RunLogger(tmp_path, report_to=("mlflow",))


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ClipmedError, match="pip install 'clipmed\\[wandb\\]'"):
        RunLogger(tmp_path, report_to=("wandb",))


def test_wandb_gets_the_scalars_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    ids = iter(["abc123", "other"])
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: next(ids)),
                                 init=lambda **kwargs: calls.append(("init", kwargs)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with RunLogger(tmp_path, report_to=("wandb",), config={"lr_new": 1e-3}) as logger:
        _log_steps(logger, range(1, 4))
    with RunLogger(tmp_path, start_step=2, report_to=("wandb",)):
        pass
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"] and inits[0]["config"] == {"lr_new": 1e-3}
    assert ("log", 3, {"validation/val_mean_recall_at_1": pytest.approx(0.3)}) in calls
    assert [c[1] for c in calls if c[0] == "log" and "train/loss" in c[2]] == [1, 2, 3]
    assert calls.count(("finish",)) == 2
