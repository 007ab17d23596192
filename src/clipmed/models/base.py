"""The interface every model family implements, so training and evaluation never look at the family."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from ..errors import ClipmedError

Tower = Literal["image", "text", "head"]
# Where a parameter's values come from; the trainer picks its learning rate from this.
#   clip:       trained contrastively already (a pretrained CLIP): small, batch-scaled rate
#   pretrained: pretrained, but never trained contrastively with the other tower (ImageNet CNN, MiniLM)
#   new:        freshly initialised (projections)
Origin = Literal["clip", "pretrained", "new"]

MAX_LOGIT_SCALE = 100.0


def tokenize_padded(tokenizer, texts: Sequence[str], context_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the batch's longest text rounded up to a multiple of 8 (never past
    the context): short batches skip most of the text compute, and aligned lengths suit fast kernels."""
    encoded = tokenizer(list(texts), padding="longest", truncation=True, max_length=context_length,
                        return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    extra = min(context_length, -(-ids.shape[1] // 8) * 8) - ids.shape[1]
    if extra > 0:
        ids = nn.functional.pad(ids, (0, extra), value=tokenizer.pad_token_id)
        mask = nn.functional.pad(mask, (0, extra), value=0)
    return {"input_ids": ids, "attention_mask": mask}


def check_tensor_shapes(expected: dict[str, torch.Tensor], weights_file: str | Path) -> None:
    """Refuse a safetensors file whose tensors do not fit the model its folder's config describes (a file from
    another model, or edited), with one line naming the file and the first tensor that does not fit; torch and
    transformers would raise a multi-line RuntimeError, or name no tensor."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        for name in handle.keys():
            shape = tuple(handle.get_slice(name).get_shape())
            if name in expected and tuple(expected[name].shape) != shape:
                raise ClipmedError(f"{weights_file}: tensor {name} has shape {list(shape)}, but the model's config "
                                   f"needs {list(expected[name].shape)}: the weights do not belong to this config; "
                                   "save or export the model again")


def set_hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    """transformers' activation checkpointing switch (named gradient_checkpointing_* before transformers 5)."""
    verb = "enable" if enabled else "disable"
    switch = getattr(model, f"activation_checkpointing_{verb}", None) or getattr(model, f"gradient_checkpointing_{verb}")
    switch()


def hf_token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text before truncation, special tokens included, as a Hugging Face tokenizer counts them."""
    return [len(ids) for ids in tokenizer(texts, truncation=False, return_attention_mask=False)["input_ids"]]


# Texts tokenized at a time when counting lengths: a whole caption pool at once holds every text's encoding
# (kilobytes each), so memory would grow with the dataset.
TOKEN_COUNT_CHUNK = 1024


@dataclass(frozen=True)
class ImagePreprocess:
    """A tower's own preprocessing: shorter side resized to `size`, centre crop `size`, then normalised."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    param: nn.Parameter
    tower: Tower
    origin: Origin
    no_decay: bool  # biases, norms and the temperature are not weight-decayed


class ClipModel(nn.Module):
    """Two towers with projections into one space and a learnable temperature.

    Subclasses implement the encoders, tokenisation, save and the parameter bookkeeping. Features returned by
    `encode_*` are projected but not normalised; `forward` normalises them.
    """

    family: str = ""
    # "conv" (a CNN) or "transformer" (a ViT): clipmed.machine's speed rules differ between the two.
    image_tower_kind: str = "transformer"
    # The speed choices (clipmed.machine.Choices) a run or an inference call has put into the model; None until then.
    machine_choices = None
    preprocess: ImagePreprocess
    logit_scale: nn.Parameter  # log of the inverse temperature, as CLIP

    def __init__(self) -> None:
        super().__init__()
        # SigLIP's learnable bias (objectives/siglip.py), saved with the model; None for softmax-trained models.
        self.register_parameter("logit_bias", None)

    def add_logit_bias(self, bias: float, log_scale: float) -> None:
        """Give the model SigLIP's learnable bias and set its temperature to exp(log_scale)."""
        self.logit_bias = nn.Parameter(torch.tensor(float(bias), device=self.logit_scale.device))
        with torch.no_grad():
            self.logit_scale.fill_(log_scale)

    # Each side is tower features, then a head. A locked tower's features can be computed once and cached
    # (LiT); the head (projection) may still train.
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features_by_length(self, texts: Sequence[str], device: torch.device | str = "cpu",
                                bucket_size: int = 8) -> torch.Tensor:
        """text_features of texts encoded in groups of similar length, each padded only to its own longest.

        Padding is masked, so the features equal those of one padded batch; but captions vary a lot in length
        (roco-radiology: mean 35 tokens, a batch of 32 pads to about 110), so most of the text compute is saved.
        """
        lengths = self.tokenize(texts)["attention_mask"].sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        # Groups of bucket_size in length order; neighbours that pad to the same length (multiple of 8) stay one
        # group, so uniform lengths (e.g. all at the context limit) cost one full-size batch, not several small ones.
        padded = ((lengths[order] + 7) // 8 * 8).clamp(max=self.context_length).tolist()
        bounds = [0]
        for start in range(bucket_size, len(texts), bucket_size):
            next_end = min(start + bucket_size, len(texts))
            if padded[start - 1] != padded[next_end - 1]:  # the next group pads longer: keep them apart
                bounds.append(start)
        bounds.append(len(texts))
        parts = []
        for start, end in zip(bounds, bounds[1:]):
            chunk = [texts[i] for i in order[start:end].tolist()]
            parts.append(self.text_features({k: v.to(device) for k, v in self.tokenize(chunk).items()}))
        return torch.cat(parts)[torch.argsort(order).to(device)]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_features(pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project_text(self.text_features(tokens))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute tower activations in backward instead of storing them: less memory, ~30% more compute."""
        raise NotImplementedError

    def select_attention(self, kind: str) -> None:
        """Attention kernel: "matmul" (plain matmul + softmax) or "fused" (torch's fused scaled-dot-product
        kernels, or what the model was loaded with); clipmed.machine decides which runs faster on a device. The
        results are the same either way. Families without a choice keep what they have."""

    def set_speed(self, *, channels_last: bool, fuse_conv_bn: bool) -> None:
        """Layout choices of a convolutional image tower (clipmed.machine decides them): channels_last memory
        format, frozen BatchNorm folded into the convolution before it. Same function either way; families
        without convolutions to speak of (ViTs) keep what they have."""

    def compile_towers(self, names: Sequence[str]) -> None:
        """torch.compile the forward of the named towers ("image", "text")."""
        for name in names:
            self.towers()[name].compile()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        raise NotImplementedError

    def token_counts(self, texts: Sequence[str]) -> Iterator[int]:
        """Tokens per text before truncation, in order, tokenized TOKEN_COUNT_CHUNK at a time (constant memory)."""
        texts = list(texts)
        for start in range(0, len(texts), TOKEN_COUNT_CHUNK):
            yield from self.token_lengths(texts[start:start + TOKEN_COUNT_CHUNK])

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many texts exceed the text tower's context and get cut."""
        return sum(length > self.context_length for length in self.token_counts(texts))

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text before truncation, special tokens included, counted as the tokenizer counts them."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def _tower_and_origin(self, name: str) -> tuple[Tower, Origin]:
        raise NotImplementedError

    def towers(self) -> dict[str, nn.Module]:
        """{"image": module, "text": module}: the encoders, for locking."""
        raise NotImplementedError

    def lora_targets(self) -> dict[str, list[str]]:
        """{tower: names (suffixes) of the modules LoRA adapts by default}; see models/lora.py."""
        raise ClipmedError(f"no default LoRA layers for {self.family} models: name them with --lora-targets")

    def describe(self) -> dict:
        """JSON-able summary written into run.json."""
        return {"family": self.family, "preprocess": self.preprocess.to_dict(), "context_length": self.context_length}

    # ---- shared behaviour -------------------------------------------------------------------------------

    def normalize_pixels(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] (the pre-resized image cache's format) -> normalised float pixels."""
        mean = torch.tensor(self.preprocess.mean, device=pixels_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=pixels_uint8.device).view(1, 3, 1, 1)
        return (pixels_uint8.float() / 255.0 - mean) / std

    def scale(self) -> torch.Tensor:
        """Inverse temperature, clamped at 100 as CLIP does."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = nn.functional.normalize(self.encode_image(pixels), dim=-1)
        text = nn.functional.normalize(self.encode_text(tokens), dim=-1)
        return image, text

    def parameter_info(self) -> Iterator[ParamInfo]:
        for name, param in self.named_parameters():
            tower, origin = ("head", "new") if name == "logit_bias" else self._tower_and_origin(name)
            if ".lora_" in name:  # a LoRA adapter (models/lora.py) is fresh whatever its layer was
                origin = "new"
            no_decay = param.ndim < 2 or name.endswith("logit_scale")
            yield ParamInfo(name, param, tower, origin, no_decay)

    def set_train_mode(self, *, freeze_batchnorm: bool, locked: tuple[str, ...] = ()) -> None:
        """train(), except locked towers (eval: no dropout, no statistics updates) and, optionally, BatchNorm
        running statistics (frozen for small fine-tuning batches)."""
        self.train()
        for name in locked:
            self.towers()[name].eval()
        if freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def model_fingerprint(model: ClipModel) -> str:
    """SHA-256 over the family, the image preprocessing and every weight's name and bytes: equal fingerprints give
    equal embeddings, wherever the model's folder lives (search indexes and the embedding cache key on it)."""
    digest = hashlib.sha256(json.dumps([model.family, model.preprocess.to_dict()], sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
