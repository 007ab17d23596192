"""Every expected failure ends `clipmed` with status 2 and one stderr line that names the problem and the fix."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from clipmed import cli
from clipmed.training.config import TrainConfig
from reliability_helpers import error_line


def fails(capsys, *argv: str) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    return error_line(capsys)


def test_cuda_out_of_memory_while_training(capsys, monkeypatch, tmp_path, prepared_synthetic):
    from clipmed.training import train as train_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity\n"
                                     "of 79.1 GiB of which 3.2 GiB is free.")

    monkeypatch.setattr(train_module, "train", oom)
    line = fails(capsys, "train", "--data", prepared_synthetic, "--out", tmp_path / "run")
    assert line.startswith("clipmed: error: out of memory while training; try a smaller --batch-size")


def test_cpu_allocator_failure_while_evaluating(capsys, monkeypatch, prepared_synthetic):
    from clipmed.data import split

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(split, "load_prepared", oom)
    line = fails(capsys, "evaluate", "--model", "dual:efficientnet-lite0+minilm", "--data", prepared_synthetic)
    assert line.startswith("clipmed: error: out of memory while evaluating; ")


def test_python_memory_error_while_preparing(capsys, monkeypatch, tmp_path, synthetic_dataset):
    from clipmed.data import split

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(split, "prepare", oom)
    assert "out of memory while preparing the data" in fails(capsys, "prepare", synthetic_dataset, "--out", tmp_path)


def test_other_runtime_errors_still_raise(monkeypatch, tmp_path, prepared_synthetic):
    """A bug must keep its traceback: only allocation failures become one-line errors."""
    from clipmed.training import train as train_module

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 16x16)")

    monkeypatch.setattr(train_module, "train", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main(["train", "--data", str(prepared_synthetic), "--out", str(tmp_path / "run")])


def test_out_of_memory_hint_names_the_options_the_command_has():
    parser = cli.build_parser()
    train = parser.parse_args(["train", "--data", "d", "--out", "o"])
    assert "a smaller --batch-size" in cli.out_of_memory_message(train)
    train.grad_checkpointing, train.accum_steps = False, 1  # once the trainer has these options, they are named
    assert cli.out_of_memory_message(train).endswith(
        "try a smaller --batch-size, --grad-checkpointing or --accum-steps")
    assert cli.out_of_memory_message(argparse.Namespace(command="evaluate")) == (
        "out of memory while evaluating; free memory held by other processes, or use a device with more memory")


def test_unknown_model_spec(capsys, tmp_path, prepared_synthetic):
    line = fails(capsys, "train", "--data", prepared_synthetic, "--model", "resnet50:imagenet", "--out",
                 tmp_path / "run", "--epochs", "1")
    assert "unknown model spec 'resnet50:imagenet'" in line and "use dual:efficientnet-lite0+minilm" in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_folder_without_metadata(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    line = fails(capsys, "prepare", tmp_path / "images", "--out", tmp_path / "out")
    assert "cannot tell the dataset format" in line and "pass --format" in line


def test_absent_label_field(capsys, tmp_path, synthetic_dataset):
    line = fails(capsys, "prepare", synthetic_dataset, "--out", tmp_path / "out", "--label-field", "organ")
    assert "no field 'organ' for the label" in line and "pass --label-field" in line


def test_nothing_left_after_cleaning(capsys, tmp_path, synthetic_dataset):
    rows = [json.loads(line) for line in (synthetic_dataset / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["file_name"] = f"elsewhere/{row['file_name']}"  # every image path is wrong
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = fails(capsys, "prepare", tmp_path, "--out", tmp_path / "out")
    assert "no usable row" in line and "missing file" in line and "check --image-root" in line
    assert not (tmp_path / "out" / "split.json").exists()


def test_run_folder_that_already_holds_a_run(capsys, tmp_path, prepared_synthetic):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "done"}))
    line = fails(capsys, "train", "--data", prepared_synthetic, "--out", run)
    assert "already holds a run" in line and "--resume" in line and "another --out" in line


def test_resume_of_a_folder_that_is_no_run(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    line = fails(capsys, "train", "--resume", tmp_path / "run")
    assert "no run to resume" in line and "--out" in line


def test_messages_with_newlines_are_printed_on_one_line(capsys, monkeypatch, tmp_path):
    from clipmed.data import split
    from clipmed.errors import ClipmedError

    def bad(*args, **kwargs):
        raise ClipmedError("first part\nsecond part")

    monkeypatch.setattr(split, "prepare", bad)
    assert fails(capsys, "prepare", tmp_path, "--out", tmp_path / "out") == "clipmed: error: first part second part"


def test_interrupted_training_says_how_to_resume(capsys, monkeypatch, tmp_path, prepared_synthetic):
    from dataclasses import asdict

    from clipmed.training import train as train_module

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": asdict(TrainConfig(out=str(run)))}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert cli.main(["train", "--resume", str(run)]) == 130
    assert capsys.readouterr().err.strip() == f"clipmed: interrupted; continue with `clipmed train --resume {run}`"
