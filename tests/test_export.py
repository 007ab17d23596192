"""Export: each family's folder loads without clipmed through exactly the code its README.md shows, and gives
clipmed's embeddings."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipmed.cli import main
from clipmed.data.records import Record
from clipmed.errors import ClipmedError
from clipmed.evaluation.embed import embed_images, embed_texts
from clipmed.export import export_model
from clipmed.models import ClipModel, load_model
from helpers import tiny_dual

TEXTS = ["A medical image of Chest", "axial CT of the abdomen showing a large hypodense mass in the liver"]


def readme_code(folder: Path) -> str:
    """The Python block of the export's README.md."""
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)


def run_readme(folder: Path) -> dict:
    """Execute exactly the README's Python block, as a user would paste it; returns its namespace."""
    namespace: dict = {"__name__": "readme"}
    exec(compile(readme_code(folder), str(folder / "README.md"), "exec"), namespace)  # noqa: S102
    return namespace


def square_images(directory: Path, size: int = 32, n: int = 2) -> list[str]:
    """Images already at the model's input size: every library's resize is then the identity."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        path = directory / f"square_{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def assert_readme_matches(model: ClipModel, folder: Path, images: list[str], *, atol: float = 1e-5) -> None:
    namespace = run_readme(folder)
    records = [Record(id=p, image_path=p, caption=None) for p in images]
    expected_images = embed_images(model, records, precision="fp32")
    expected_texts = embed_texts(model, TEXTS, precision="fp32")
    assert torch.allclose(namespace["embed_images"](images).float(), expected_images, atol=atol)
    assert torch.allclose(namespace["embed_texts"](TEXTS).float(), expected_texts, atol=atol)


def test_dual_export_loads_with_plain_pytorch(tmp_path):
    model = tiny_dual()
    folder = export_model(model, tmp_path / "export", source="tiny dual")
    for part in ("text/config.json", "text/tokenizer_config.json", "image_tower.safetensors",
                 "projections.safetensors", "README.md"):
        assert (folder / part).exists(), part
    assert not re.search(r"^(import|from) clipmed", readme_code(folder), re.M)  # plain PyTorch and the libraries
    namespace = run_readme(folder)
    assert torch.equal(namespace["heads"]["logit_scale"], model.logit_scale.detach())
    assert_readme_matches(model, folder, square_images(tmp_path / "images"))


def test_dual_readme_resizes_like_clipmed(tmp_path, synthetic_dataset):
    """Images of another size (48x40) go through the README's own resize and crop: still clipmed's embeddings."""
    model = tiny_dual()
    folder = export_model(model, tmp_path / "export", source="tiny dual")
    images = [str(synthetic_dataset / "images" / f"img_{i:04d}.png") for i in range(3)]
    assert_readme_matches(model, folder, images)


def test_hf_export_is_save_pretrained(tiny_hf, tmp_path):
    from transformers import CLIPModel

    model = load_model(str(tiny_hf))
    folder = export_model(model, tmp_path / "export", source=str(tiny_hf))
    assert not (folder / "clipmed_hf.json").exists()  # plain save_pretrained output, no clipmed marker
    CLIPModel.from_pretrained(str(folder))
    assert_readme_matches(model, folder, square_images(tmp_path / "images"), atol=1e-4)


def test_cli_exports_a_run_and_refuses_a_used_folder(tiny_dual_folder, tmp_path, capsys):
    assert main(["export", str(tiny_dual_folder), str(tmp_path / "out")]) == 0
    assert "README.md" in capsys.readouterr().out
    assert main(["export", str(tiny_dual_folder), str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(ClipmedError):
        export_model(load_model(str(tiny_dual_folder)), tmp_path / "out", source="again")
