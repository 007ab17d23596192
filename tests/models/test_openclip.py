"""open_clip models: spec and folder loading, the common interface, fine-tuning with clipmed's trainer, evaluation,
and folders that open_clip alone reopens. Tiny architectures registered from configs: nothing is downloaded."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from clipmed.errors import ClipmedError
from clipmed.models import OpenCLIP, load_model
from helpers import TINY_TEXT, minilm_tokenizer
from test_export import assert_readme_matches, square_images

open_clip = pytest.importorskip("open_clip")

TEXTS = ["A medical image of Chest", "axial CT of the abdomen showing a large hypodense mass in the liver"]
TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TINY_CLIP = {"embed_dim": 16, "vision_cfg": TINY_VISION,
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_ARCH = "clipmed-tiny-vit"
PIXELS = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A tiny ViT + text transformer registered with open_clip under TINY_ARCH."""
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return TINY_ARCH


@pytest.fixture(scope="module")
def tiny_weights(tiny_arch, tmp_path_factory):
    """Weights of a tiny open_clip model in a safetensors file, as a released checkpoint would be."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained_text=False)
    path = tmp_path_factory.mktemp("open_clip_weights") / "tiny.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def _embed(model, pixels_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.select_attention("matmul")  # the kernel clipmed's training and evaluation run with
    model.eval()
    with torch.no_grad():
        return model(model.normalize_pixels(pixels_uint8), model.tokenize(TEXTS))


def _assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_spec_with_weights_file_speaks_the_interface(tiny_arch, tiny_weights):
    model = load_model(f"openclip:{tiny_arch}:{tiny_weights}")
    assert isinstance(model, OpenCLIP)
    assert model.logit_scale is model.model.logit_scale
    assert model.preprocess.size == 32 and model.preprocess.interpolation == "bicubic"
    assert model.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    image, text = _embed(model, PIXELS)
    assert image.shape == (2, 16) and text.shape == (2, 16)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    # Same weights as the file: the text features equal open_clip's own on its own tokens.
    plain = open_clip.create_model(tiny_arch, pretrained=str(tiny_weights)).eval()
    with torch.no_grad():
        expected = plain.encode_text(open_clip.get_tokenizer(tiny_arch)(TEXTS))
    assert torch.allclose(model.encode_text(model.tokenize(TEXTS)), expected)
    infos = list(model.parameter_info())
    assert {i.origin for i in infos} == {"clip"}
    by_tower = {i.name: i.tower for i in infos}
    assert by_tower["model.visual.conv1.weight"] == "image"
    assert by_tower["model.token_embedding.weight"] == "text" and by_tower["model.text_projection"] == "text"
    assert by_tower["model.logit_scale"] == "head"
    # towers() holds exactly each side's parameters, though `CLIP` keeps its text parts at its top level.
    for side, tower in model.towers().items():
        assert set(tower.state_dict()) == {name.removeprefix(f"model.{'visual.' if side == 'image' else ''}")
                                           for name, part in by_tower.items() if part == side}


def test_tokenize_pads_to_the_context_and_counts_truncation(tiny_arch):
    model = load_model(f"openclip:{tiny_arch}")
    tokens = model.tokenize(["a b", "mass " * 100])
    assert tokens["input_ids"].shape == (2, 32) == tokens["attention_mask"].shape
    assert tokens["attention_mask"][0].tolist() == [1] * 4 + [0] * 28  # start, a, b, end
    assert tokens["attention_mask"][1].all()
    assert model.context_length == 32 and model.count_truncated(["a b", "mass " * 100]) == 1


def test_fresh_architecture_is_new_and_locks_its_text_tower(tiny_arch):
    model = load_model(f"openclip:{tiny_arch}")
    assert {i.origin for i in model.parameter_info()} == {"new"}
    model.set_train_mode(freeze_batchnorm=False, locked=("text",))
    assert not model.model.transformer.training and model.model.visual.training


def test_saved_folder_round_trips_and_opens_with_open_clip_alone(tiny_arch, tiny_weights, tmp_path):
    model = load_model(f"openclip:{tiny_arch}:{tiny_weights}")
    before = _embed(model, PIXELS)
    model.save(tmp_path / "m")
    reopened = load_model(str(tmp_path / "m"))
    assert isinstance(reopened, OpenCLIP) and reopened.origin == "clip"
    assert reopened.describe()["source"] == f"openclip:{tiny_arch}:{tiny_weights}"
    _assert_same(before, _embed(reopened, PIXELS))
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm'}")
    plain.eval()
    with torch.no_grad():
        image = plain.encode_image(model.normalize_pixels(PIXELS), normalize=True)
    assert torch.allclose(image, before[0], atol=1e-6)


def test_export_loads_with_open_clip_alone(tiny_arch, tiny_weights, tmp_path):
    from clipmed.export import export_model

    model = load_model(f"openclip:{tiny_arch}:{tiny_weights}")
    folder = export_model(model, tmp_path / "export", source="tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "open_clip_config.json",
                                                        "open_clip_model.safetensors"]
    assert_readme_matches(model, folder, square_images(tmp_path / "images"))
    _assert_same(_embed(model, PIXELS), _embed(load_model(f"openclip:local-dir:{folder}"), PIXELS))  # clipmed reopens it


def test_hugging_face_text_tower_folder_keeps_its_tokenizer(tmp_path):
    """A BiomedCLIP-like architecture (a BERT text tower with its own tokenizer) reopens from its folder alone."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**TINY_TEXT)).save_pretrained(str(tmp_path / "bert"))
    minilm_tokenizer().save_pretrained(str(tmp_path / "bert"))
    config = {"embed_dim": 16, "vision_cfg": TINY_VISION,
              "text_cfg": {"hf_model_name": str(tmp_path / "bert"), "hf_tokenizer_name": str(tmp_path / "bert"),
                           "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler", "context_length": 24}}
    (tmp_path / "clipmed-tiny-bert.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "clipmed-tiny-bert.json")
    torch.manual_seed(0)
    model = load_model("openclip:clipmed-tiny-bert")
    tokens = model.tokenize(TEXTS)
    assert tokens["input_ids"].shape == (2, 24)
    assert tokens["attention_mask"].tolist() == (tokens["input_ids"] != 0).long().tolist()
    assert model.towers()["text"] is model.model.text
    before = _embed(model, PIXELS)
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer_config.json").exists()
    _assert_same(before, _embed(load_model(str(tmp_path / "saved")), PIXELS))


def test_fine_tune_and_evaluate_like_the_other_families(tiny_arch, tiny_weights, prepared_synthetic, tmp_path,
                                                        monkeypatch):
    from clipmed.data.split import load_prepared
    from clipmed.evaluation.evaluate import EvalConfig, zero_shot_evaluation
    from clipmed.training.config import TrainConfig
    from clipmed.training.train import train

    monkeypatch.setenv("CLIPMED_CACHE", str(tmp_path / "cache"))  # the locked text tower's feature cache
    spec = f"openclip:{tiny_arch}:{tiny_weights}"
    run = train(TrainConfig(data=str(prepared_synthetic), out=str(tmp_path / "run"), model=spec, objective="caption",
                            epochs=1, batch_size=8, max_steps=4, lr_clip=1e-4, precision="fp32", lock_text=True,
                            grad_checkpointing=True), progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["family"] == "openclip" and {g["origin"] for g in info["optimizer"]["groups"]} == {"clip"}
    trained = load_model(str(run))
    assert isinstance(trained, OpenCLIP) and trained.origin == "clip"
    start = load_model(spec)
    assert not torch.equal(trained.model.visual.conv1.weight, start.model.visual.conv1.weight)  # it trained
    assert torch.equal(trained.model.text_projection, start.model.text_projection)  # the locked tower did not
    assert list((tmp_path / "cache" / "features").glob("*/features.safetensors"))  # the locked text tower's
    prepared = load_prepared(prepared_synthetic)
    result = zero_shot_evaluation(trained, prepared.records("test"), prepared.classes,
                                  EvalConfig(precision="fp32", n_boot=10))
    assert result["n"] == len(prepared.records("test")) and 0.0 <= result["top1"] <= 1.0
    trained.save(tmp_path / "again")  # a saved run model saves and reopens again, same weights
    _assert_same(_embed(trained, PIXELS), _embed(load_model(str(tmp_path / "again")), PIXELS))


def test_errors_are_clear(tiny_arch, tmp_path, monkeypatch):
    with pytest.raises(ClipmedError, match="no architecture"):
        load_model("openclip:no-such-arch")
    with pytest.raises(ClipmedError, match="cannot open"):
        load_model(f"openclip:{tiny_arch}:{tmp_path / 'missing.safetensors'}")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the extra were not installed
    with pytest.raises(ClipmedError, match=r"pip install 'clipmed\[openclip\]'"):
        load_model(f"openclip:{tiny_arch}")


def test_cpu_attention_choice_gives_the_same_embeddings_and_gradients(tiny_arch, tiny_weights):
    """select_attention (math SDPA on the CPU) changes the kernel, not the numbers; with gradient checkpointing
    the encoders keep torch's own choice, so backward's recomputation matches the forward."""
    def embeddings_and_grads(select: bool, checkpointing: bool = False):
        model = load_model(f"openclip:{tiny_arch}:{tiny_weights}")
        model.set_grad_checkpointing(checkpointing)
        if select:
            model.select_attention("matmul")
        image, text = model(model.normalize_pixels(PIXELS), model.tokenize(TEXTS))
        (image @ text.t()).sum().backward()
        return image, text, model.model.visual.conv1.weight.grad

    reference = embeddings_and_grads(select=False)
    for selected in (embeddings_and_grads(select=True), embeddings_and_grads(select=True, checkpointing=True)):
        for a, b in zip(reference, selected):
            assert torch.allclose(a, b, atol=1e-5)
