"""A fuzz test of the command line: each sub-command, with odd values for the options its parser declares (found
by walking the parser, so new flags are fuzzed too) on small generated datasets (malformed lines, odd encodings,
paths escaping the dataset folder, odd numbers), ends with status 0, or 2 and one error line: never a traceback.
It writes nothing outside its --out and clipmed's cache folder.

Derandomized with a fixed number of examples per group of commands: CI runs the same cases every time, in
bounded time. Commands run in this process (clipmed.cli.main); training is capped at two steps, and `reproduce`
and `sweep` run their command line, recipe and checks with the pipeline itself replaced (tests/test_pipeline.py
runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipmed import cli

# Flags never fuzzed: slow by design (torch.compile, the whole sweep), help, and the output path (each example
# picks its own: new, an existing file, a folder with files in it).
UNFUZZED = {"--compile", "--sweep", "--help", "-h", "--out"}
INTS = ["-4", "-1", "0", "1", "2", "3.5", "1e3", "nan", "x", ""]
FLOATS = ["-1", "0", "1e-3", "0.5", "1", "2", "nan", "inf", "-inf", "1e308", "x", ""]
LISTS = ["0.5,1", "1", "", ",", "0", "-1", "2", "x,1", "nan"]
HUGE = "99999999999999999999"
HUGE_OK = {"--seed", "--top-k", "--n", "--min-class-count", "--checkpoint-every"}  # huge values cost nothing here
TEXTS = ["", " ", "x", "ü/é", "../escape", "/etc/passwd", "a,,b", "{label}", "{", "{other} {label}", "\t"]
FIELDS = ["caption", "body_part", "id", "file_name", "nope", "", "article"]
BY_DEST = {"labels": ["Chest,Abdomen", "a", "", ",", "a,a", "é,ü"],
           "template": ["A medical image of {label}", "{label}", "x", "{", "{other}"],
           "label_template": ["A medical image of {label}", "x", "{", "{other}"],
           "classes": ["Chest,Abdomen,Head", "Chest", "", ",", "nope"],
           "objectives": ["caption", "label", "semantic,label", "bogus", "", ","],
           "fractions": LISTS, "semantic_temperatures": LISTS,
           "caption_field": FIELDS, "label_field": FIELDS, "image_field": FIELDS, "group_field": FIELDS,
           "id_field": FIELDS, "device": ["cpu", "cuda", "mps", "meta", "x"], "query": ["chest", "", "ü" * 3,
                                                                                      "x " * 3000]}
# Dataset mutations: each adds rows or changes the file so that the dataset is odd in one way.
MUTATIONS = ["malformed_line", "latin1_caption", "parent_path", "absolute_path", "symlink_out", "etc_passwd",
             "numbers", "nan_caption", "empty_caption", "missing_image", "duplicate_id", "bom", "crlf",
             "null_line", "array_line", "text_image", "empty_file", "case_labels", "csv"]
FUZZ = dict(derandomize=True, deadline=None, database=None, print_blob=False,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])


def _sub_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def _options(command: str) -> list[argparse.Action]:
    """The flags of a sub-command that the fuzz varies (positionals are given by the examples)."""
    return [a for a in _sub_parsers()[command]._actions
            if a.option_strings and not set(a.option_strings) & UNFUZZED]


def _values(action: argparse.Action, paths: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """Odd values for one flag, by what the parser says it takes."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return st.just([flag])
    kind = getattr(action.type, "__name__", None)
    if action.choices is not None:
        pool = [str(c) for c in action.choices] + ["bogus"]
    elif kind == "int":
        pool = INTS + ([HUGE] if flag in HUGE_OK else [])
    elif kind == "float":
        pool = FLOATS
    elif kind == "list":
        pool = LISTS
    elif action.dest in BY_DEST:
        pool = BY_DEST[action.dest]
    else:  # a path or free text
        pool = TEXTS + list(paths.values())
    return st.sampled_from(pool).map(lambda value: [flag, value])


@st.composite
def fuzzed_flags(draw, command: str, paths: dict[str, str]) -> list[str]:
    options = _options(command)
    if not options:
        return []
    chosen = draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique_by=id))
    return [part for action in chosen for part in draw(_values(action, paths))]


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((12, 16, 3), colour, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_dataset(root: Path, mutations: list[str]) -> Path:
    """A 12-row imagefolder dataset (3 classes) with the given mutations; outside.png lies beside it."""
    data = root / "data"
    _image(root / "outside.png", (9, 9, 9))
    rows = []
    for index in range(12):
        label = ["Chest", "Abdomen", "Head"][index % 3]
        _image(data / "images" / f"{index}.png", (40 * (index % 3), 200 - 40 * (index % 3), 90))
        rows.append({"id": f"r{index}", "file_name": f"images/{index}.png", "article": f"a{index // 2}",
                     "caption": f"Radiograph of the {label.lower()} number {index}.", "body_part": label})
    lines = [json.dumps(row).encode() for row in rows]
    for mutation in mutations:
        if mutation == "malformed_line":
            lines.append(b'{"id": "broken", "file_name": ')
        elif mutation == "latin1_caption":
            lines.append('{"id": "latin", "file_name": "images/0.png", "caption": "caf\u00e9 \u00e0 la radio"}'
                         .encode("latin-1"))
        elif mutation == "parent_path":
            lines.append(json.dumps({"id": "up", "file_name": "../outside.png", "caption": "outside"}).encode())
        elif mutation == "absolute_path":
            lines.append(json.dumps({"id": "abs", "file_name": str(root / "outside.png"), "caption": "abs"}).encode())
        elif mutation == "symlink_out":
            (data / "images" / "link.png").symlink_to(root / "outside.png")
            lines.append(json.dumps({"id": "link", "file_name": "images/link.png", "caption": "link"}).encode())
        elif mutation == "etc_passwd":
            lines.append(json.dumps({"id": "passwd", "file_name": "/etc/passwd", "caption": "passwd"}).encode())
        elif mutation == "numbers":
            lines.append(json.dumps({"id": 1.5, "file_name": "images/1.png", "caption": 3, "body_part": 7,
                                     "article": 2}).encode())
        elif mutation == "nan_caption":
            lines.append(b'{"id": "nan", "file_name": "images/2.png", "caption": NaN, "body_part": Infinity}')
        elif mutation == "empty_caption":
            lines.append(json.dumps({"id": "empty", "file_name": "images/3.png", "caption": " "}).encode())
        elif mutation == "missing_image":
            lines.append(json.dumps({"id": "gone", "file_name": "images/gone.png", "caption": "gone"}).encode())
        elif mutation == "duplicate_id":
            lines.append(json.dumps({**rows[0], "caption": "again"}).encode())
        elif mutation == "bom":
            lines[0] = b"\xef\xbb\xbf" + lines[0]
        elif mutation == "crlf":
            lines = [line + b"\r" for line in lines]
        elif mutation == "null_line":
            lines.append(b"null")
        elif mutation == "array_line":
            lines.append(b"[1, 2]")
        elif mutation == "text_image":
            (data / "images" / "notes.png").write_text("not an image")
            lines.append(json.dumps({"id": "notes", "file_name": "images/notes.png", "caption": "n"}).encode())
        elif mutation == "empty_file":
            lines = []
        elif mutation == "case_labels":
            lines += [json.dumps({**rows[i], "id": f"c{i}", "body_part": f" {rows[i]['body_part'].upper()} "}).encode()
                      for i in range(3)]
    (data / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    if "csv" in mutations:  # the same dataset as a CSV (open_clip's layout), with a latin-1 row and a broken quote
        table = [b"file_name,caption,body_part"] + [f"images/{i}.png,A scan {i},Chest".encode() for i in range(3)]
        table += ["images/0.png,caf\u00e9,Head".encode("latin-1"), b'images/1.png,"unclosed,Head', b"only-one-column"]
        (data / "captions.csv").write_bytes(b"\r\n".join(table) + b"\r\n")
    return data


def _state(paths: list[Path]) -> dict[str, tuple]:
    """Every file and folder under `paths`: (is folder, size, mtime) by path; symlinks are not followed."""
    state = {}
    for top in paths:
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(folder) / name
                stat = path.lstat()
                state[str(path)] = (name in dirs, stat.st_size, stat.st_mtime_ns)
    return state


def run_cli(argv: list[str], sandbox: Path, watched: list[Path], outputs: list[Path]) -> int:
    """Run one command; check its status, its error line and what it wrote; returns the status."""
    before = _state([sandbox, *watched])
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(sandbox)  # a command that writes a relative path by mistake writes into the watched sandbox
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
    except BaseException:
        pytest.fail(f"clipmed {' '.join(argv)} raised:\n{traceback.format_exc()}\nstderr:\n{err.getvalue()[-2000:]}")
    finally:
        os.chdir(previous)
    stderr = err.getvalue()
    assert status in (0, 2), f"clipmed {' '.join(argv)}: status {status}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, f"clipmed {' '.join(argv)}:\n{stderr[-3000:]}"
    if status == 2:
        lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("clipmed: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"clipmed {' '.join(argv)}:\n{stderr[-2000:]}"
    after = _state([sandbox, *watched])
    resumed = [argv[i + 1] for i, part in enumerate(argv[:-1]) if part == "--resume"]  # a run folder it writes
    allowed = [str(path) for path in outputs] + [os.path.abspath(os.path.join(sandbox, path)) for path in resumed]

    def inside(path: str) -> bool:
        return any(path == out or path.startswith(out + os.sep) for out in allowed)

    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path)
                     and not inside(path))
    assert not changed, f"clipmed {' '.join(argv)} wrote outside its --out: {changed[:5]}"
    return status


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """Read-only inputs shared by every example: a tiny model, a prepared dataset, an index, a run."""
    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare
    from helpers import tiny_dual

    root = tmp_path_factory.mktemp("fuzz-fixtures")
    model = root / "model"
    tiny_dual(image_size=32).save(model)
    data = write_dataset(root, [])
    prepared = root / "prepared"
    prepare(str(data), prepared, fields=FieldMap(), min_class_count=2, progress=False)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["index", "--model", str(model), "--data", str(data), "--out", str(root / "index")]) == 0
    recipe = root / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 1\n")
    broken = root / "broken.yaml"
    broken.write_text("train: [\n")
    return {"root": root, "model": model, "data": data, "prepared": prepared, "index": root / "index",
            "recipe": recipe, "broken_yaml": broken}


def _sandbox(draw, fixtures: dict[str, Path]) -> tuple[Path, Path, str]:
    """A fresh folder with a mutated dataset; returns (sandbox, dataset, --out kind)."""
    sandbox = Path(tempfile.mkdtemp(prefix="fuzz-", dir=fixtures["root"]))
    data = write_dataset(sandbox, draw(st.lists(st.sampled_from(MUTATIONS), max_size=3, unique=True)))
    (sandbox / "a-file").write_text("x")
    (sandbox / "full").mkdir()
    (sandbox / "full" / "keep.txt").write_text("x")
    (sandbox / "suite.yaml").write_text("datasets:\n  - {name: d, data: data, label_field: body_part, min_class_count: 1}\n")
    return sandbox, data, draw(st.sampled_from(["new", "new", "new", "file", "full"]))


def _out(sandbox: Path, kind: str, name: str) -> Path:
    return {"new": sandbox / name, "file": sandbox / "a-file", "full": sandbox / "full"}[kind]


def _paths(sandbox: Path, data: Path, fixtures: dict[str, Path]) -> dict[str, str]:
    """Path values a free-text flag may get: real inputs of every kind, and files of the wrong kind."""
    return {"data": str(data), "prepared": str(fixtures["prepared"]), "model": str(fixtures["model"]),
            "recipe": str(fixtures["recipe"]), "broken_yaml": str(fixtures["broken_yaml"]),
            "file": str(sandbox / "a-file"), "missing": str(sandbox / "missing"),
            "image": str(data / "images" / "0.png"), "csv": str(data / "captions.csv")}


def _watched(fixtures: dict[str, Path]) -> list[Path]:
    return [fixtures[name] for name in ("model", "data", "prepared", "index")]


# What a command that ends with status 0 must have written (zero-step training once reported success without a
# model): a path under its --out ("" for --out itself).
PRODUCT = {"prepare": "split.json", "train": "model", "index": "index.json", "export": "README.md", "embed": "",
           "evaluate": "", "sweep": "sweep.json", "benchmark": "benchmark.json", "wise-ft": "model"}
# Commands whose own work is not run here: the CLI, its recipe handling and its checks are (the pipeline is
# tests/test_pipeline.py's).
STUBBED = {"reproduce": ("clipmed.pipeline.reproduce", {"models": {}}), "sweep": ("clipmed.pipeline.sweep", {})}
# Examples per command: the commands that train or embed cost seconds per valid example.
EXAMPLES = {"prepare": 6, "entities": 4, "predict": 4, "embed": 3, "index": 3, "search": 4, "export": 3,
            "evaluate": 3, "train": 3, "sweep": 5, "reproduce": 8, "benchmark": 3, "wise-ft": 3}


def _base_argv(command: str, draw, sandbox: Path, dataset: Path, out: Path, fixtures: dict[str, Path],
               paths: dict[str, str]) -> list[str]:
    """The arguments a command needs (so that the fuzzed flags, not a missing argument, decide the outcome)."""
    model = str(fixtures["model"])
    training = ["--data", str(fixtures["prepared"]), "--model", model, "--out", str(out), "--max-steps", "2",
                "--epochs", "1", "--batch-size", "4", "--precision", "fp32"]
    if command == "predict":
        image = draw(st.sampled_from([paths["image"], paths["file"], paths["missing"], str(dataset)]))
        return ["--model", model, image, "--labels", "Chest,Abdomen,Head"]
    return {"prepare": [str(dataset), "--out", str(out)],
            "entities": [str(dataset)],
            "embed": ["--model", model, "--data", str(dataset), "--out", str(out)],
            "index": ["--model", model, "--data", str(dataset), "--out", str(out)],
            "search": ["--model", model, "--index", str(fixtures["index"]), "chest"],
            "export": [model, str(out)],
            "evaluate": ["--model", model, "--data", str(dataset), "--split", "all", "--min-class-count", "1",
                         "--out", str(out)],
            "train": training,
            "sweep": [*training, "--fractions", "1", "--objectives", "caption"],
            "reproduce": ["--data", str(dataset), "--out", str(out), "--model", model],
            "benchmark": ["--model", model, "--suite", str(sandbox / "suite.yaml"), "--out", str(out)],
            "wise-ft": ["--base", model, "--finetuned", model, "--data", str(fixtures["prepared"]), "--out", str(out),
                        "--precision", "fp32"]}[command]


def test_every_command_is_fuzzed():
    """A new sub-command fails here until it has a number of examples in EXAMPLES (and arguments in _base_argv)."""
    assert set(EXAMPLES) == set(_sub_parsers())


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_command(command, fixtures):

    @settings(max_examples=EXAMPLES[command], **FUZZ)
    @given(st.data())
    def fuzz(data):
        sandbox, dataset, out_kind = _sandbox(data.draw, fixtures)
        paths = _paths(sandbox, dataset, fixtures)
        out = _out(sandbox, out_kind, {"embed": "out.parquet", "evaluate": "out.json"}.get(command, "out"))
        csv = dataset / "captions.csv"
        source = csv if csv.exists() else dataset
        argv = [command, *_base_argv(command, data.draw, sandbox, source, out, fixtures, paths),
                *data.draw(fuzzed_flags(command, paths))]
        try:
            with contextlib.ExitStack() as stack:
                if command in STUBBED:
                    target, result = STUBBED[command]
                    stack.enter_context(mock.patch(target, return_value=result))
                status = run_cli(argv, sandbox, _watched(fixtures), [out])
            resumed = [argv[i + 1] for i, part in enumerate(argv[:-1]) if part == "--resume"]
            target = Path(resumed[-1]) if resumed else out
            if status == 0 and command in PRODUCT:
                assert (target / PRODUCT[command]).exists(), f"clipmed {' '.join(argv)}: status 0 without its output"
        finally:
            shutil.rmtree(sandbox, ignore_errors=True)

    fuzz()
