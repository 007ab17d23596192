"""The pooled features of transformers' CLIP towers without computing the last layer for tokens nobody reads.

CLIP keeps one token per input from its last layer: the class token of an image, the end-of-text token of a
text. Every other token's last-layer output is discarded, yet `CLIPVisionModel` / `CLIPTextModel` compute all
of them. Here the layers before the last run as transformers runs them; the last layer computes keys and
values for every token (the pooled token attends to them) but its query, attention output, MLP and norms for
the pooled token only. That is about 5% fewer FLOPs for a ViT-B/32 CLIP, the same numbers up to floating-point order
(tests/models/test_clip_pooling.py checks outputs and gradients against transformers' own forward).

The image tower's patch embedding is computed as what it is, one matmul of the image's non-overlapping patches
with the convolution's weight, instead of a strided convolution: the same function, whose backward on CPUs is a
small matmul rather than oneDNN's convolution backward (a tenth of a ViT-B/32 training step on an Intel Xeon with
AMX, README "Performance").

Only the exact transformers classes take this path; anything else (a model with its own code) falls back to
its `pooler_output`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F


def supports_pooled_forward(vision_model: nn.Module, text_model: nn.Module) -> bool:
    """True for transformers' own CLIP towers in the layout this module reproduces (transformers 5: the towers
    are CLIPVisionModel / CLIPTextModel and the causal mask comes from `masking_utils`)."""
    from transformers.models.clip.modeling_clip import CLIPTextModel, CLIPVisionModel

    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:
        return False
    return (type(vision_model) is CLIPVisionModel and type(text_model) is CLIPTextModel
            and "cache" in inspect.signature(create_causal_mask).parameters)


def _last_layer_at(layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                   key_mask: torch.Tensor | None) -> torch.Tensor:
    """One CLIP encoder layer's output [B, D] at `positions` (one token per sequence), attending to every key
    that `key_mask` [B, N] allows (all when None): the computation of `CLIPEncoderLayer` restricted to that row."""
    attn = layer.self_attn
    batch, length, width = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    x = layer.layer_norm1(hidden)
    split = (batch, length, attn.num_heads, attn.head_dim)
    query = attn.q_proj(x[rows, positions]).view(batch, attn.num_heads, 1, attn.head_dim)
    keys = attn.k_proj(x).view(split).transpose(1, 2)
    values = attn.v_proj(x).view(split).transpose(1, 2)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * attn.scale  # [B, heads, 1, N]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=attn.dropout if attn.training else 0.0)
    attended = attn.out_proj(torch.matmul(weights, values).reshape(batch, width))
    pooled = hidden[rows, positions] + attended
    return pooled + layer.mlp(layer.layer_norm2(pooled))


def _vision_embeddings(embeddings: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """`CLIPVisionEmbeddings(pixels)` [B, 1 + patches, D] with the patch convolution as a matmul over the
    unfolded patches (its stride is its kernel, no padding); other layouts go through the module itself."""
    conv = embeddings.patch_embedding
    batch, channels, height, width = pixels.shape
    size = conv.kernel_size[0]
    if (conv.stride != conv.kernel_size or conv.kernel_size != (size, size) or conv.padding != (0, 0)
            or conv.dilation != (1, 1) or conv.groups != 1 or height != embeddings.image_size
            or width != embeddings.image_size):
        return embeddings(pixels)
    rows, cols = height // size, width // size
    patches = (pixels.to(conv.weight.dtype).reshape(batch, channels, rows, size, cols, size)
               .permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * size * size))
    patch_embeds = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    class_embeds = embeddings.class_embedding.expand(batch, 1, -1)
    return torch.cat([class_embeds, patch_embeds], dim=1) + embeddings.position_embedding(embeddings.position_ids)


def vision_pooled(vision_model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """`CLIPVisionModel(pixel_values=pixels).pooler_output`: the post-norm class token."""
    hidden = vision_model.pre_layrnorm(_vision_embeddings(vision_model.embeddings, pixels))
    *first, last = vision_model.encoder.layers
    for layer in first:
        hidden = layer(hidden, None)
    class_token = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return vision_model.post_layernorm(_last_layer_at(last, hidden, class_token, None))


def text_pooled(text_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`CLIPTextModel(input_ids, attention_mask).pooler_output`: the final-norm end-of-text token."""
    from transformers.masking_utils import create_causal_mask

    hidden = text_model.embeddings(input_ids=input_ids)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              cache=None)
    *first, last = text_model.encoder.layers
    for layer in first:
        hidden = layer(hidden, mask, is_causal=True)
    # Where transformers pools: the highest token id for configs from before its eos fix (eos_token_id == 2),
    # otherwise the first end-of-text token.
    if text_model.eos_token_id == 2:
        positions = input_ids.to(torch.int).argmax(dim=-1)
    else:
        positions = (input_ids == text_model.eos_token_id).int().argmax(dim=-1)
    # The pooled token sees itself and what precedes it (causal), except padding.
    keys = torch.arange(input_ids.shape[1], device=input_ids.device)
    key_mask = (keys[None, :] <= positions[:, None]) & attention_mask.bool()
    return text_model.final_layer_norm(_last_layer_at(last, hidden, positions, key_mask))
