"""The pooled-token last layer of transformers' CLIP towers gives transformers' own pooler_output and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from clipmed.models.clip_pooling import supports_pooled_forward, text_pooled, vision_pooled


def _tiny_clip(eos_token_id: int, attention: str) -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=eos_token_id,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).double()
    model.set_attn_implementation(attention)
    return model


def _texts(eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded texts of lengths 16, 9 and 4, each ending with its end-of-text token."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, 16), generator=generator)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate((16, 9, 4)):
        mask[row, :length] = 1
        ids[row, length - 1] = 98 if eos_token_id == 2 else eos_token_id  # legacy configs pool at the highest id
        ids[row, length:] = 0
    return ids, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("eos_token_id", [2, 49407 % 99])
def test_pooled_forward_equals_transformers(attention, eos_token_id):
    model = _tiny_clip(eos_token_id, attention)
    assert supports_pooled_forward(model.vision_model, model.text_model)
    ids, mask = _texts(eos_token_id)
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)

    def both(fast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        if fast:
            image, text = vision_pooled(model.vision_model, pixels), text_pooled(model.text_model, ids, mask)
        else:
            image = model.vision_model(pixel_values=pixels).pooler_output
            text = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        (image.sin().sum() + text.cos().sum()).backward()
        return torch.cat([image, text]), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, expected_grads = both(fast=False)
    got, got_grads = both(fast=True)
    # Exact up to float64 rounding against eager attention; torch's fused CPU kernel itself is only about
    # float32-accurate, even in float64.
    tolerance = 1e-12 if attention == "eager" else 1e-6
    assert torch.allclose(got, expected, atol=tolerance)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=tolerance), name


def test_other_towers_keep_their_own_forward():
    model = _tiny_clip(5, "eager")
    assert not supports_pooled_forward(torch.nn.Identity(), model.text_model)


def test_patch_embedding_runs_as_a_matmul_with_transformers_result():
    from clipmed.models.clip_pooling import _vision_embeddings

    embeddings = _tiny_clip(2, "eager").vision_model.embeddings
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = embeddings(pixels)
    embeddings.patch_embedding.forward = None  # the convolution itself must not run
    torch.testing.assert_close(_vision_embeddings(embeddings, pixels), expected, rtol=0, atol=1e-12)
