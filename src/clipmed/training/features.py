"""Locked-tower feature cache (LiT): a frozen tower whose input is not augmented gives the same features
every epoch, so compute them once, keep them on disk keyed by weights and data, and train only the rest."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..cache import cache_dir
from ..data.datasets import pixel_batches
from ..data.records import Record
from ..data.store import StoreOptions, wait_lock
from ..io import atomic_write
from ..machine import ready_for_inference
from ..models.base import ClipModel
from ..precision import autocast


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
              data_fingerprint: str, batch_size: int = 64, store: StoreOptions = StoreOptions(),
              loader_workers: int | None = None) -> "LockedFeatures":
        """Load the features from the disk cache (`clipmed.cache`, kind "features"), or compute them (eval mode,
        no grad; images read from the image store) and store them under the entry's lock."""
        keys = [r.id for r in inputs] if side == "image" else list(dict.fromkeys(inputs))
        folder = cache_dir("features", side, _module_fingerprint(model.towers()[side]), precision, data_fingerprint,
                           repr(model.preprocess), keys)
        path = folder / "features.safetensors"
        if not path.exists():
            with wait_lock(folder, what="feature cache"):
                if not path.exists():  # another process may have computed it while this one waited
                    features = cls._compute(model, side, inputs if side == "image" else keys, precision, batch_size,
                                            store, loader_workers)
                    atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, tmp))
        return cls(keys, load_file(str(path))["features"])

    @staticmethod
    @torch.no_grad()
    def _compute(model: ClipModel, side: str, inputs: Sequence, precision: str, batch_size: int,
                 store: StoreOptions, loader_workers: int | None) -> torch.Tensor:
        tower = model.towers()[side]
        was_training = tower.training
        tower.eval()
        device = next(model.parameters()).device
        ready_for_inference(model, device)
        if side == "image":
            batches = pixel_batches([r.image_path for r in inputs], model.preprocess.size,
                                    model.preprocess.interpolation, batch_size=batch_size, store=store,
                                    workers=loader_workers, device=device)
        else:
            batches = (inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size))
        chunks = []
        for chunk in batches:
            with autocast(precision, device):
                if side == "image":
                    pixels = model.normalize_pixels(chunk.to(device, non_blocking=True))
                    chunks.append(model.image_features(pixels).float().cpu())
                else:
                    tokens = {k: v.to(device) for k, v in model.tokenize(chunk).items()}
                    chunks.append(model.text_features(tokens).float().cpu())
        tower.train(was_training)
        return torch.cat(chunks)
