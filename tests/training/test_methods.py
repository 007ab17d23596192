"""Adaptation methods on the dual default and on a transformers CLIP: SigLIP's saved bias, LoRA merged on save,
LP-FT's frozen first phase, WiSE-FT's interpolation end points."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from clipmed.cli import main
from clipmed.data.datasets import pixel_batches
from clipmed.data.split import load_prepared
from clipmed.errors import ClipmedError
from clipmed.inference import label_probabilities
from clipmed.models import load_model
from clipmed.models.lora import add_lora, merged
from clipmed.objectives import get_objective
from clipmed.training.config import TrainConfig
from clipmed.training.step import StepRunner
from clipmed.training.train import train, training_rows
from clipmed.training.wise_ft import check_same_architecture, interpolate
from helpers import tiny_dual, tiny_hf_folder

PIXELS = torch.rand(2, 3, 32, 32)
TEXTS = ["Radiograph of the chest", "axial CT of the abdomen showing a mass"]


@pytest.fixture(scope="module", params=["dual", "hf"])
def family_folder(request, tiny_dual_folder, tmp_path_factory):
    return tiny_dual_folder if request.param == "dual" else tiny_hf_folder(tmp_path_factory.mktemp("hf"))


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(PIXELS, model.tokenize(TEXTS))


def _config(prepared, model, out, **values) -> TrainConfig:
    return TrainConfig(**{**dict(data=str(prepared), model=str(model), out=str(out), epochs=1, batch_size=8,
                                 precision="fp32", lr_new=3e-3, lr_pretrained=3e-3, lr_clip=3e-3), **values})


def test_siglip_trains_and_saves_its_temperature_and_bias(prepared_synthetic, family_folder, tmp_path):
    run = train(_config(prepared_synthetic, family_folder, tmp_path / "run", objective="siglip", max_steps=2),
                progress=False)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    model = load_model(str(run))
    assert model.logit_bias is not None and model.logit_bias.item() == pytest.approx(state["logit_bias"].item())
    assert model.logit_bias.item() != -10.0 and model.scale().item() == pytest.approx(10.0, rel=0.2)
    weights = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    probabilities = label_probabilities(weights[:1], weights, 10.0, -10.0)
    assert torch.allclose(probabilities, torch.sigmoid(10.0 * weights[:1] @ weights.t() - 10.0))


def _lora_model(family: str, tmp_path):
    return tiny_dual() if family == "dual" else load_model(str(tiny_hf_folder(tmp_path / "hf")))


HEAD_PARTS = ("projection", "logit_scale")  # what trains fully under LoRA and in LP-FT's first phase


@pytest.mark.parametrize("family", ["dual", "hf"])
def test_lora_trains_adapters_only_and_merges_into_a_plain_model(family, prepared_synthetic, tmp_path):
    from clipmed.training.optim import build_optimizer

    model = _lora_model(family, tmp_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    keys = set(model.state_dict())
    adapted = [model.towers()[name] for name in add_lora(model, 2)]  # dual: the text tower only
    frozen = {id(p) for tower in adapted for p in tower.parameters() if not p.requires_grad}
    assert frozen
    config = TrainConfig(objective="caption", precision="fp32", batch_size=8, lr_new=1e-2)
    optimizer, _ = build_optimizer(model, config)
    objective = get_objective("caption")
    rows = training_rows(load_prepared(prepared_synthetic), config)
    runner = StepRunner(model, objective.loss(config, model), config)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        batch = objective.batch(rows, torch.arange(8 * step, 8 * step + 8), config)
        pixels = next(pixel_batches([r.image_path for r in batch.images], model.preprocess.size,
                                    model.preprocess.interpolation, batch_size=8, store=None))
        runner(dataclasses.replace(batch, pixels=pixels))
        optimizer.step()
    after = dict(model.named_parameters())
    assert any("lora_B" in name and after[name].abs().sum() > 0 for name in after)  # the adapters trained
    for name, value in before.items():  # an adapted tower's weights (under an adapter or not) are unchanged
        module, _, leaf = name.rpartition(".")
        now = after[name] if name in after else after[f"{module}.base_layer.{leaf}"]
        if id(now) in frozen:
            assert torch.equal(now, value), name
        elif any(part in name for part in HEAD_PARTS):
            assert not torch.equal(now, value), name
    plain = merged(model)
    assert set(plain.state_dict()) == keys  # no peft layer left: a plain model of its family
    for a, b in zip(_outputs(model), _outputs(plain)):
        assert torch.allclose(a, b, atol=1e-5)


def test_lp_ft_leaves_the_towers_unchanged_in_its_first_phase(prepared_synthetic, family_folder, tmp_path):
    config = _config(prepared_synthetic, family_folder, tmp_path / "lp", objective="label", lp_epochs=1)
    per_epoch = len(training_rows(load_prepared(prepared_synthetic), config).records) // config.batch_size
    start = load_model(str(family_folder)).state_dict()
    for name, steps, frozen in (("lp", per_epoch, True), ("ft", per_epoch + 1, False)):
        run = train(_config(prepared_synthetic, family_folder, tmp_path / name, objective="label", lp_epochs=1,
                            max_steps=steps), progress=False)
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        changed = {key for key, value in state.items() if key in start and value.is_floating_point()
                   and not torch.equal(value, start[key])}
        assert any(part in key for key in changed for part in HEAD_PARTS)
        towers = {key for key in changed if not any(part in key for part in HEAD_PARTS)}
        assert bool(towers) != frozen, (name, sorted(towers)[:3])


def test_wise_ft_end_points_are_the_two_models_exactly(family_folder, tmp_path):
    base = load_model(str(family_folder))
    finetuned = load_model(str(family_folder))
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for alpha, expected in ((0.0, base), (1.0, finetuned)):
        for a, b in zip(_outputs(interpolate(base, finetuned, alpha)), _outputs(expected)):
            assert torch.equal(a, b)
    half = _outputs(interpolate(base, finetuned, 0.5))[0]
    assert not torch.equal(half, _outputs(base)[0]) and not torch.equal(half, _outputs(finetuned)[0])


def test_wise_ft_command_chooses_alpha_on_val_and_refuses_another_architecture(prepared_synthetic, tiny_dual_folder,
                                                                                 tiny_hf, tmp_path, capsys):
    finetuned = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "ft", objective="label", max_steps=3),
                      progress=False)
    assert main(["wise-ft", "--base", str(tiny_dual_folder), "--finetuned", str(finetuned), "--data",
                 str(prepared_synthetic), "--alphas", "0,0.5,1", "--out", str(tmp_path / "mixed"),
                 "--precision", "fp32"]) == 0
    saved = json.loads((tmp_path / "mixed" / "run.json").read_text())["wise_ft"]
    assert [p["alpha"] for p in saved["alphas"]] == [0.0, 0.5, 1.0]
    best = max(saved["alphas"], key=lambda p: p["score"])
    assert saved["chosen"] == best["alpha"]
    for point in saved["alphas"]:
        assert point["score"] == pytest.approx((point["val_zero_shot_top1"] + point["val_mean_recall_at_1"]) / 2)
    assert (tmp_path / "mixed" / "model").is_dir()
    assert main(["wise-ft", "--base", str(tiny_hf), "--finetuned", str(finetuned), "--data", str(prepared_synthetic),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "not the same architecture" in capsys.readouterr().err
    with pytest.raises(ClipmedError, match="not the same architecture"):
        check_same_architecture(tiny_dual(), load_model(str(tiny_hf)), ("a", "b"))
