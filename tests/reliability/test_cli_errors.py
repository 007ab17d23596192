"""Every expected failure ends `clipmed` with status 2 and one stderr line that names the problem and the fix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only folder, or (as root, whom permissions do not stop)
    sysfs."""
    import os
    import tempfile

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes (root on a system without sysfs)")


def _refuse_work(monkeypatch):
    """Make loading any model fail loudly: the commands below must stop before it."""
    from clipmed import models

    def work(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking where it writes")

    monkeypatch.setattr(models, "load_model", work)


def test_outputs_in_unwritable_folders_are_refused_before_any_work(capsys, monkeypatch, tmp_path, prepared_synthetic,
                                                                   synthetic_dataset, tiny_dual_folder):
    unwritable = _unwritable_folder(tmp_path)
    _refuse_work(monkeypatch)
    line = fails(capsys, "index", "--model", tiny_dual_folder, "--data", synthetic_dataset, "--out",
                 unwritable / "index")
    assert f"cannot write in {unwritable}" in line and "--out" in line
    line = fails(capsys, "evaluate", "--model", tiny_dual_folder, "--data", prepared_synthetic, "--out",
                 unwritable / "metrics.json")
    assert f"cannot write in {unwritable}" in line
    assert "cannot write in" in fails(capsys, "prepare", synthetic_dataset, "--out", unwritable / "prepared")
    assert "cannot write in" in fails(capsys, "benchmark", "--model", tiny_dual_folder, "--suite", tmp_path / "suite.yaml",
                                      "--out", unwritable / "benchmark")


def test_outputs_of_the_wrong_kind_are_refused(capsys, monkeypatch, tmp_path, prepared_synthetic, synthetic_dataset,
                                               tiny_dual_folder):
    _refuse_work(monkeypatch)
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    for argv in (["prepare", synthetic_dataset], ["train", "--data", prepared_synthetic],
                 ["index", "--model", tiny_dual_folder, "--data", synthetic_dataset]):
        assert f"--out {existing} is a file, not a folder" in fails(capsys, *argv, "--out", existing)
    assert f"{existing} is a file, so nothing can be written under it" in fails(
        capsys, "index", "--model", tiny_dual_folder, "--data", synthetic_dataset, "--out", existing / "index")
    assert "is a file, not a folder" in fails(capsys, "export", tiny_dual_folder, existing)
    line = fails(capsys, "evaluate", "--model", tiny_dual_folder, "--data", prepared_synthetic, "--out", tmp_path)
    assert f"--out {tmp_path} is a folder: give a file path" in line
    assert "is a folder" in fails(capsys, "embed", "--model", tiny_dual_folder, "--data", synthetic_dataset, "--out",
                                  tmp_path)


def _with_misshapen_tensor(folder: Path, weights: str, name: str | None = None) -> tuple[Path, str]:
    """The model folder with one 2-D tensor given one more row (the weights of some other config)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / weights))
    name = name or next(key for key, tensor in state.items() if tensor.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(folder / weights), metadata={"format": "pt"})
    return folder, name


def test_weights_of_the_wrong_shape_are_named(capsys, tmp_path, prepared_synthetic, synthetic_dataset,
                                              tiny_dual_folder, tiny_hf):
    import shutil

    dual, tensor = _with_misshapen_tensor(shutil.copytree(tiny_dual_folder, tmp_path / "dual"), "model.safetensors")
    image = synthetic_dataset / "images" / "img_0000.png"
    for argv in (["predict", "--model", dual, image, "--labels", "A,B"],
                 ["evaluate", "--model", dual, "--data", prepared_synthetic],
                 ["export", dual, tmp_path / "exported"]):
        line = fails(capsys, *argv)
        assert f"{dual / 'model.safetensors'}: tensor {tensor} has shape" in line and "config needs" in line
    hf, tensor = _with_misshapen_tensor(shutil.copytree(tiny_hf, tmp_path / "hf"), "model.safetensors",
                                        "text_projection.weight")
    line = fails(capsys, "predict", "--model", hf, image, "--labels", "A,B")
    assert f"{hf / 'model.safetensors'}: tensor text_projection.weight has shape [17, 32]" in line


def test_a_run_folder_without_a_model_says_so(capsys, tmp_path, synthetic_dataset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "done"}))  # a zero-step or unfinished run: no model/
    line = fails(capsys, "predict", "--model", run, synthetic_dataset / "images" / "img_0000.png", "--labels", "A,B")
    assert f"{run} is a run folder without a finished model: resume it" in line and "or train it" in line


def test_a_bad_flag_is_one_line_naming_the_help(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--epochs", "three"])
    assert exited.value.code == 2
    assert error_line(capsys) == ("clipmed: error: argument --epochs: invalid int value: 'three' "
                                  "(see `clipmed train --help`)")
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    assert "invalid choice: 'trian'" in error_line(capsys)


def test_yaml_inputs_that_are_not_text(capsys, tmp_path, synthetic_dataset, tiny_dual_folder):
    binary = tmp_path / "image.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    image = synthetic_dataset / "images" / "img_0000.png"
    for argv in (["entities", synthetic_dataset, "--vocabulary", binary],
                 ["predict", "--model", tiny_dual_folder, image, "--labels", "A,B", "--templates", binary],
                 ["train", "--data", tmp_path, "--out", tmp_path / "run", "--config", binary]):
        assert f"{binary}: not UTF-8 text (byte 0)" in fails(capsys, *argv)


def _refused_when_parsing(capsys, argv: list, flag: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([str(a) for a in argv])
    assert exited.value.code == 2
    line = error_line(capsys)
    assert line.startswith(f"clipmed: error: argument {flag}: "), line
    return line


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--max-steps", "0"),
                                         ("--batch-size", "-4"), ("--batch-size", "0"), ("--accum-steps", "0"),
                                         ("--lr-new", "0"), ("--lr-new", "inf"), ("--warmup-fraction", "1.5"),
                                         ("--semantic-temperature", "0"), ("--seed", "-1")])
def test_training_that_cannot_run_is_refused_when_parsing(capsys, monkeypatch, tmp_path, prepared_synthetic, flag,
                                                          value):
    """Zero-step training once reported "run written" without a model (and --batch-size 0 divided by zero after
    42 s): every numeric option is checked by argparse, before a model loads."""
    _refuse_work(monkeypatch)
    _refused_when_parsing(capsys, ["train", "--data", prepared_synthetic, "--out", tmp_path / "run", flag, value], flag)
    assert not (tmp_path / "run").exists()


def test_top_k_is_checked_when_parsing(capsys, monkeypatch, tmp_path, synthetic_dataset):
    _refuse_work(monkeypatch)
    image = synthetic_dataset / "images" / "img_0000.png"
    _refused_when_parsing(capsys, ["predict", "--model", "m", image, "--labels", "A,B", "--top-k", "0"], "--top-k")
    _refused_when_parsing(capsys, ["search", "--model", "m", "--index", tmp_path, "x", "--top-k", "-2"], "--top-k")


def test_every_numeric_option_has_a_range(capsys):
    """Each int or float option of each sub-command refuses a hugely negative value, NaN and infinity when parsing."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            kind = getattr(action.type, "__name__", None)
            if not action.option_strings or kind not in ("int", "float"):
                continue
            for value in ("nan", "inf", str(-10 ** 30)):
                with pytest.raises((argparse.ArgumentTypeError, ValueError)):  # argparse reports either
                    action.type(value)
            checked.append(f"{name} {action.option_strings[0]}")
    assert "train --epochs" in checked and "predict --top-k" in checked and "benchmark --n-boot" in checked


def test_a_recipe_value_out_of_range_is_refused(capsys, monkeypatch, tmp_path, prepared_synthetic):
    """A recipe's values meet the ranges of the flags they stand for (a recipe could set zero epochs)."""
    _refuse_work(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 0\n")
    line = fails(capsys, "train", "--config", recipe, "--data", prepared_synthetic, "--out", tmp_path / "run")
    assert line == f"clipmed: error: {recipe}: 'train.epochs': 0 is below the minimum 1"


def test_templates_with_other_fields_are_refused_before_any_work(capsys, monkeypatch, tmp_path, prepared_synthetic,
                                                                 synthetic_dataset):
    _refuse_work(monkeypatch)
    image = synthetic_dataset / "images" / "img_0000.png"
    for argv in (["evaluate", "--model", "m", "--data", prepared_synthetic, "--template", "{other} {label}"],
                 ["train", "--data", prepared_synthetic, "--out", tmp_path / "run", "--label-template", "{other}"]):
        assert "must contain exactly one {label} and no other fields" in fails(capsys, *argv)
    assert not (tmp_path / "run").exists()
