"""The dual model's speed layouts (clipmed.machine decides them) compute the same function: channels_last and
BatchNorm folded into the convolution against the package's own EfficientNet forward."""

from __future__ import annotations

import torch

from helpers import tiny_dual

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _frozen(model):
    model.set_train_mode(freeze_batchnorm=True)
    return model


def _features_and_grads(model, features):
    out = features(PIXELS)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    tower = model.image_tower
    grads = {name: p.grad.clone() for name, p in tower.named_parameters()}
    tower.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_channels_last_and_folded_batchnorm_match_the_packaged_forward():
    model = _frozen(tiny_dual())
    reference = _features_and_grads(model, lambda x: model.image_tower.extract_features(x).mean(dim=(2, 3)))
    model.set_speed(channels_last=True, fuse_conv_bn=True)
    assert model.image_tower._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    fast = _features_and_grads(model, model.image_features)
    assert torch.allclose(fast[0], reference[0], atol=1e-5, rtol=1e-4)
    for name, grad in reference[1].items():
        assert torch.allclose(fast[1][name], grad, atol=1e-5, rtol=1e-3), name


def test_folding_frozen_batchnorm_is_exact_in_float64():
    model = _frozen(tiny_dual()).double()
    global PIXELS
    pixels, PIXELS = PIXELS, PIXELS.double()
    try:
        model.set_speed(channels_last=False, fuse_conv_bn=False)
        unfused = _features_and_grads(model, model.image_features)
        model.set_speed(channels_last=False, fuse_conv_bn=True)
        fused = _features_and_grads(model, model.image_features)
    finally:
        PIXELS = pixels
    assert torch.allclose(fused[0], unfused[0], atol=1e-12)
    assert all(torch.allclose(fused[1][name], grad, atol=1e-12) for name, grad in unfused[1].items())
    assert unfused[1]["_bn0.weight"].abs().sum() > 0  # the fold passes gradients to BatchNorm's affine parameters


def test_batchnorm_that_updates_its_statistics_is_not_folded():
    model = tiny_dual()
    model.set_train_mode(freeze_batchnorm=False)
    model.set_speed(channels_last=True, fuse_conv_bn=True)
    before = model.image_tower._bn0.running_mean.clone()
    model.image_features(PIXELS)
    assert not torch.equal(model.image_tower._bn0.running_mean, before)


def test_saved_weights_are_contiguous_and_reload_into_the_default_layout(tmp_path):
    from clipmed.models import load_model

    model = _frozen(tiny_dual())
    model.set_speed(channels_last=True, fuse_conv_bn=True)
    with torch.no_grad():
        expected = model.image_features(PIXELS)
    model.save(tmp_path / "saved")
    reloaded = _frozen(load_model(str(tmp_path / "saved")))
    with torch.no_grad():
        assert torch.allclose(reloaded.image_features(PIXELS), expected, atol=1e-5, rtol=1e-4)
