"""Models: every family round-trips through its folder, speaks the common interface, and loads safely."""

from __future__ import annotations

import json

import pytest
import torch

from clipmed.errors import ClipmedError
from clipmed.models import DualEncoderCLIP, HFCLIP, base, load_model, model_dir
from helpers import tiny_dual

TEXTS = ["A medical image of Chest", "axial CT of the abdomen showing a large hypodense mass in the liver"]


def _embed(model, pixels_uint8):
    model.eval()
    with torch.no_grad():
        return model(model.normalize_pixels(pixels_uint8), model.tokenize(TEXTS))


def test_dual_round_trip_gives_identical_embeddings(tmp_path):
    model = tiny_dual()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    before = _embed(model, pixels)
    model.save(tmp_path / "m")
    reopened = load_model(str(tmp_path / "m"))
    assert isinstance(reopened, DualEncoderCLIP)
    after = _embed(reopened, pixels)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert json.loads((tmp_path / "m" / "clipmed_dual.json").read_text())["family"] == "dual"


def test_dual_embeddings_are_unit_norm_and_temperature_starts_at_clip_value():
    model = tiny_dual()
    image, text = _embed(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0  # clamped as CLIP


def test_dual_tokenizer_pads_to_multiple_of_eight_and_counts_truncation():
    model = tiny_dual()
    tokens = model.tokenize(TEXTS)
    assert tokens["input_ids"].shape[1] % 8 == 0
    assert tokens["input_ids"].shape[1] <= model.context_length
    long_caption = "mass " * 200
    assert model.count_truncated([long_caption, "short"]) == 1
    assert model.tokenize([long_caption])["input_ids"].shape[1] == model.context_length


def test_truncation_is_counted_in_chunks_with_the_same_result(monkeypatch):
    """A caption pool is tokenized a chunk at a time (memory bounded); chunk edges change no count."""
    model = tiny_dual()
    texts = ["mass " * 200, "short", "effusion " * 150, "a", "b", "nodule " * 300, "c"]
    whole = model.count_truncated(texts)
    monkeypatch.setattr(base, "TOKEN_COUNT_CHUNK", 2)
    assert model.count_truncated(texts) == whole == 3


def test_parameter_info_separates_towers_heads_and_no_decay():
    infos = list(tiny_dual().parameter_info())
    towers = {i.tower for i in infos}
    assert towers == {"image", "text", "head"}
    heads = {i.name: i for i in infos if i.tower == "head"}
    assert set(heads) == {"image_projection.weight", "text_projection.weight", "logit_scale"}
    assert heads["logit_scale"].no_decay and not heads["image_projection.weight"].no_decay
    assert all(i.no_decay for i in infos if i.param.ndim < 2)


def test_hf_clip_round_trip_opens_with_plain_transformers(tiny_hf, tmp_path):
    from transformers import CLIPModel

    model = load_model(f"hf:{tiny_hf}")
    assert isinstance(model, HFCLIP) and model.preprocess.size == 32
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    before = _embed(model, pixels)
    model.save(tmp_path / "saved")
    plain = CLIPModel.from_pretrained(str(tmp_path / "saved"))  # other tools open it without clipmed
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.model.parameters())
    after = _embed(load_model(str(tmp_path / "saved")), pixels)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_hf_clip_uses_plain_attention_on_cpu_with_the_same_embeddings(tiny_hf, tmp_path):
    model = load_model(f"hf:{tiny_hf}")
    assert model.model.config._attn_implementation == "sdpa"  # transformers' default, kept in saved folders
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    before = _embed(model, pixels)
    model.select_attention("matmul")
    assert model.model.text_model.config._attn_implementation == "eager"
    after = _embed(model, pixels)
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)
    model.save(tmp_path / "saved")
    assert "eager" not in (tmp_path / "saved" / "config.json").read_text()


def test_run_folder_resolves_to_its_model(tmp_path):
    tiny_dual().save(tmp_path / "run" / "model")
    assert model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    assert isinstance(load_model(str(tmp_path / "run")), DualEncoderCLIP)


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ClipmedError, match="unknown model spec"):
        load_model("resnet:foo")
    with pytest.raises(ClipmedError, match="unknown model spec"):
        load_model(str(tmp_path))  # an empty folder


def test_packaged_efficientnet_weights_load_with_weights_only():
    from clipmed.models.dual import load_efficientnet_lite0_weights

    state = load_efficientnet_lite0_weights()
    assert "_conv_stem.weight" in state and state["_conv_stem.weight"].shape == (32, 3, 3, 3)


@pytest.mark.parametrize("family", ["dual", "hf"])
def test_gradient_checkpointing_gives_the_same_gradients(family, tiny_hf):
    model = tiny_dual() if family == "dual" else load_model(f"hf:{tiny_hf}")
    model.eval()  # no dropout, BatchNorm statistics fixed: the two passes must agree exactly
    pixels = model.normalize_pixels(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    tokens = model.tokenize(TEXTS + ["a third caption"])

    def gradients():
        model.zero_grad()
        image, text = model(pixels, tokens)
        (image @ text.t()).logsumexp(1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.set_grad_checkpointing(True)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize("family", ["dual", "hf"])
def test_length_bucketed_text_features_equal_one_padded_batch(family, tiny_hf):
    model = tiny_dual() if family == "dual" else load_model(f"hf:{tiny_hf}")
    model.eval()
    texts = ["CT", "axial CT of the abdomen showing a large hypodense mass in the liver with ascites " * 2,
             "chest x-ray", "MRI of the knee", "panoramic dental radiograph showing a cyst"]
    with torch.no_grad():
        one_batch = model.text_features(model.tokenize(texts))
        bucketed = model.text_features_by_length(texts, bucket_size=2)
    assert torch.allclose(one_batch, bucketed, atol=1e-5)


def test_uniform_length_texts_are_encoded_as_one_batch(monkeypatch):
    model = tiny_dual()
    calls = []
    real = model.text_features
    monkeypatch.setattr(model, "text_features", lambda tokens: calls.append(len(tokens["input_ids"])) or real(tokens))
    model.text_features_by_length(["mass " * 40] * 16, bucket_size=4)  # all cut at the context: one padded length
    assert calls == [16]
    calls.clear()
    model.text_features_by_length(["CT"] * 4 + ["mass " * 40] * 4, bucket_size=4)
    assert calls == [4, 4]
