"""Locked-tower feature cache (LiT): a frozen tower whose input is not augmented gives the same features
every epoch, so compute them once, keep them on disk keyed by weights and data, and train only the rest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..data.datasets import stack_images
from ..data.records import Record
from ..io import atomic_write
from ..machine import attention_for
from ..models.base import ClipModel
from ..precision import autocast


def cache_root() -> Path:
    return Path(os.environ.get("CLIPMED_CACHE", Path.home() / ".cache" / "clipmed")) / "features"


def _module_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LockedFeatures:
    """Features of a locked tower for a fixed list of inputs (image records or texts), looked up by key."""

    def __init__(self, keys: Sequence[str], features: torch.Tensor) -> None:
        self.index = {key: row for row, key in enumerate(keys)}
        self.features = features

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        return self.features[[self.index[key] for key in keys]]

    @classmethod
    def build(cls, model: ClipModel, side: str, inputs: Sequence[Record] | Sequence[str], *, precision: str,
              data_fingerprint: str, batch_size: int = 64) -> "LockedFeatures":
        """Load the features from the disk cache, or compute them (eval mode, no grad) and store them."""
        keys = [r.id for r in inputs] if side == "image" else list(dict.fromkeys(inputs))
        digest = hashlib.sha256()
        for part in (side, _module_fingerprint(model.towers()[side]), precision, data_fingerprint,
                     repr(model.preprocess), *keys):
            digest.update(str(part).encode())
        path = cache_root() / f"{side}-{digest.hexdigest()[:32]}.safetensors"
        if path.exists():
            return cls(keys, load_file(str(path))["features"])
        features = cls._compute(model, side, inputs if side == "image" else keys, precision, batch_size)
        atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, tmp))
        return cls(keys, features)

    @staticmethod
    @torch.no_grad()
    def _compute(model: ClipModel, side: str, inputs: Sequence, precision: str, batch_size: int) -> torch.Tensor:
        tower = model.towers()[side]
        was_training = tower.training
        tower.eval()
        device = next(model.parameters()).device
        model.select_attention(attention_for(device))
        chunks = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            with autocast(precision, device):
                if side == "image":
                    pixels = stack_images(chunk, model.preprocess.size, model.preprocess.interpolation).to(device)
                    chunks.append(model.image_features(model.normalize_pixels(pixels)).float().cpu())
                else:
                    tokens = {k: v.to(device) for k, v in model.tokenize(chunk).items()}
                    chunks.append(model.text_features(tokens).float().cpu())
        tower.train(was_training)
        return torch.cat(chunks)
