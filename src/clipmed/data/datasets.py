"""Torch-side data: a pre-resized uint8 image cache and the batches the trainer and evaluator consume.

Images are decoded once, resized to the tower's input (shorter side, then centre crop) and kept as uint8
[3, S, S] tensors: later epochs and later models with the same input size cost no decoding at all.
Normalisation happens on the batch (`ClipModel.normalize_pixels`), so one cache serves every tower of that size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .images import ImageError, open_rgb
from .records import Record

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Shorter side to `size`, centre crop to size x size, as uint8 [3, size, size]."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), _INTERPOLATION[interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageCache:
    """Process-wide cache of pre-resized uint8 images keyed by (path, size, interpolation)."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int, str], torch.Tensor] = {}

    def get(self, path: str, size: int, interpolation: str = "bicubic") -> torch.Tensor:
        key = (path, size, interpolation)
        if key not in self._store:
            self._store[key] = resize_center_crop(open_rgb(path), size, interpolation)
        return self._store[key]

    def warm(self, paths: Sequence[str], size: int, interpolation: str = "bicubic", threads: int = 2,
             progress: Callable[[Iterator], Iterator] | None = None) -> dict[str, str]:
        """Decode every missing image with a thread pool (PIL releases the GIL while decoding).

        Returns {path: reason} for images that could not be read (a file that changed after prepare):
        callers skip and count those rows instead of crashing a long run.
        """
        missing = sorted({p for p in paths if (p, size, interpolation) not in self._store})
        failures: dict[str, str] = {}

        def load(path: str) -> tuple[str, torch.Tensor | None, str | None]:
            try:
                return path, resize_center_crop(open_rgb(path), size, interpolation), None
            except ImageError as exc:
                return path, None, exc.reason

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(load, missing)
            for path, tensor, reason in (progress(results) if progress else results):
                if tensor is None:
                    failures[path] = reason
                else:
                    self._store[(path, size, interpolation)] = tensor
        return failures

    def __len__(self) -> int:
        return len(self._store)


IMAGE_CACHE = ImageCache()


def readable_records(records: Sequence[Record], size: int, interpolation: str = "bicubic",
                     cache: ImageCache = IMAGE_CACHE, progress: Callable[[Iterator], Iterator] | None = None
                     ) -> tuple[list[int], dict[str, str]]:
    """Indices of the records whose image decodes (cached as a side effect), and {id: reason} of the others."""
    failures = cache.warm([r.image_path for r in records], size, interpolation, progress=progress)
    keep = [i for i, r in enumerate(records) if r.image_path not in failures]
    return keep, {r.id: failures[r.image_path] for r in records if r.image_path in failures}


def stack_images(records: Sequence[Record], size: int, interpolation: str = "bicubic",
                 cache: ImageCache = IMAGE_CACHE) -> torch.Tensor:
    """uint8 [B, 3, S, S] for the records' images."""
    return torch.stack([cache.get(r.image_path, size, interpolation) for r in records])
