"""Torch-side data: pixels read from the image store (or from files) through a DataLoader, in a fixed order.

Batches are uint8 [B, 3, S, S]; normalisation happens on the batch (`ClipModel.normalize_pixels`), so one store
serves every tower of that input size. Training reads the rows of each batch in `epoch_order`, and a row's
augmentation depends only on (seed, epoch, row): the pixels of a step are the same whatever the number of loader
workers, the batch's position, the process count or a resume.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..processes import loader_context, worker_init
from .images import open_rgb
from .records import Record
from .store import INTERPOLATION, ImageStore, StoreOptions, open_store, resize_shorter

# Loader worker processes by default: one per two cores, at least one, at most four (DEVELOPERS.md says what was
# measured): a worker overlaps reading with the step; on 2 cores a second one takes CPU from the step's threads.
DEFAULT_LOADER_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 2))


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """The centre size x size of an image whose shorter side is `size`, as uint8 [3, size, size]."""
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Shorter side to `size`, centre crop to size x size, as uint8 [3, size, size] (evaluation's pixels)."""
    return center_crop(resize_shorter(image, size, interpolation), size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def row_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """The random stream of one row's augmentation in one epoch, independent of everything else."""
    state = np.random.SeedSequence([seed, epoch, row]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class Augment:
    """Training augmentation (open_clip's --aug-cfg in spirit): a random resized crop of `scale` of the area and
    an aspect ratio in `ratio`, a rotation uniform in +-`rotation` degrees, brightness and contrast factors uniform
    in 1 +- `jitter`, and a horizontal flip with probability 1/2 only when `hflip` (laterality matters in medicine)."""

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 10.0
    jitter: float = 0.1
    hflip: bool = False

    def __call__(self, image: Image.Image, size: int, interpolation: str, rng: torch.Generator) -> torch.Tensor:
        u = torch.rand(25, generator=rng, dtype=torch.float64).tolist()  # a fixed number of draws per image
        left, top, width, height = self._crop_box(image.size, u[:20])
        image = image.resize((size, size), INTERPOLATION[interpolation], box=(left, top, left + width, top + height))
        if self.hflip and u[20] < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rotation:
            image = image.rotate((2 * u[21] - 1) * self.rotation, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        # numpy, not torch: per-image arithmetic this small only pays torch's thread start-up.
        pixels = np.asarray(image, dtype=np.float32)
        if self.jitter:
            brightness, contrast = (1 + (2 * u[i] - 1) * self.jitter for i in (22, 23))
            pixels = pixels * np.float32(brightness)
            mean = pixels.mean(dtype=np.float64).astype(np.float32)
            pixels = (pixels - mean) * np.float32(contrast) + mean
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def _crop_box(self, shape: tuple[int, int], u: list[float]) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop parameters, from given uniforms (5 tries of 4 draws, then the centre)."""
        width, height = shape
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for attempt in range(5):
            a, b, c, d = u[4 * attempt: 4 * attempt + 4]
            target = area * (self.scale[0] + a * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + b * (log_hi - log_lo))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(c * (width - w + 1)), int(d * (height - h + 1)), w, h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side


class StoreImages(Dataset):
    """Pixels of store rows. An item is a store row (centre crop) or (row, epoch, key): the row's augmentation for
    that epoch, `key` naming the training row whose random stream it uses; without `augment`, a centre crop."""

    def __init__(self, store: ImageStore, augment: Augment | None = None, seed: int = 0) -> None:
        self.store, self.augment, self.seed = store, augment, seed

    def __getitem__(self, item: int | tuple[int, int, int]) -> torch.Tensor:
        row, epoch, key = item if isinstance(item, tuple) else (item, 0, 0)
        image = self.store.image(row)
        if self.augment is None or not isinstance(item, tuple):
            return center_crop(image, self.store.size)
        return self.augment(image, self.store.size, self.store.interpolation, row_generator(self.seed, epoch, key))

    def __len__(self) -> int:
        return len(self.store)


class FileImages(Dataset):
    """Pixels decoded straight from image files (a few images named on the command line: no store needed)."""

    def __init__(self, paths: Sequence[str], size: int, interpolation: str) -> None:
        self.paths, self.size, self.interpolation = list(paths), size, interpolation

    def __getitem__(self, item: int) -> torch.Tensor:
        return resize_center_crop(open_rgb(self.paths[item]), self.size, self.interpolation)

    def __len__(self) -> int:
        return len(self.paths)


class EpochBatches:
    """The image items of every training step from `start` to `stop`: each step's rows of `epoch_order`, those
    with an image, this rank's contiguous share of them (`shard`: slice for a row count), as StoreImages items."""

    def __init__(self, store_rows: np.ndarray, has_image: np.ndarray, *, seed: int, batch_size: int,
                 steps_per_epoch: int, start: int, stop: int, shard=lambda n: slice(0, n)) -> None:
        self.store_rows, self.has_image = store_rows, has_image
        self.seed, self.batch_size, self.steps_per_epoch = seed, batch_size, steps_per_epoch
        self.start, self.stop, self.shard = start, stop, shard

    def step_rows(self, step: int) -> torch.Tensor:
        """The training rows of `step` (what the trainer builds its batch from)."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.store_rows), self.seed, epoch)
        return order[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.stop):
            rows = self.step_rows(step).numpy()
            rows = rows[self.has_image[rows]]
            epoch = step // self.steps_per_epoch
            yield [(int(self.store_rows[r]), epoch, int(r)) for r in rows[self.shard(len(rows))]]

    def __len__(self) -> int:
        return self.stop - self.start


def loader(dataset: Dataset, batches: Iterable[list], *, workers: int | None = None,
           device: torch.device | str = "cpu") -> DataLoader:
    """uint8 pixel batches in `batches` order, read by `workers` processes (None: DEFAULT_LOADER_WORKERS; 0: this
    process), pinned for a CUDA device."""
    workers = DEFAULT_LOADER_WORKERS if workers is None else workers
    # Its own generator: a DataLoader draws its workers' base seed from it, which must not advance the global RNG
    # (dropout): a resumed run creates its loaders at other moments than the run it continues.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=torch.Generator(),
                      pin_memory=torch.device(device).type == "cuda",
                      multiprocessing_context=loader_context() if workers else None,
                      worker_init_fn=worker_init() if workers else None)


class RowBatches:
    """A DataLoader batch sampler over an int64 array of store rows, `batch_size` at a time, in order: a pass over
    a million rows holds 8 bytes per row, not a Python list per batch."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows, self.batch_size = rows, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.rows), self.batch_size):
            yield self.rows[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


def store_batches(store: ImageStore, rows: np.ndarray, *, batch_size: int, workers: int | None = None,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Centre-cropped uint8 batches of these store rows in order, through one DataLoader (its workers live for the
    whole pass)."""
    return iter(loader(StoreImages(store), RowBatches(rows, batch_size), workers=workers, device=device))


def pixel_batches(paths: Sequence[str], size: int, interpolation: str, *, batch_size: int,
                  store: StoreOptions | ImageStore | None = StoreOptions(), workers: int | None = None,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Centre-cropped uint8 batches of these images in order: from the image store (built for what it lacks; or an
    opened ImageStore that holds them all), or with `store=None` decoded from the files (an unreadable file raises
    its ImageError)."""
    if not paths:
        return iter(())
    if store is None:
        return iter(loader(FileImages(paths, size, interpolation), RowBatches(np.arange(len(paths)), batch_size),
                           workers=workers, device=device))
    image_store = store if isinstance(store, ImageStore) else open_store(paths, size, interpolation, store)
    rows, failures = image_store.lookup(paths)
    if failures or (rows < 0).any():
        path = next(iter(failures), None) or paths[int(np.flatnonzero(rows < 0)[0])]
        raise ValueError(f"{path}: not a readable image in the store; pass only records readable_records kept")
    return store_batches(image_store, rows, batch_size=batch_size, workers=workers, device=device)


def readable_records(records: Sequence[Record], size: int, interpolation: str = "bicubic",
                     store: StoreOptions = StoreOptions(), *, progress: bool = False
                     ) -> tuple[list[int], dict[str, str]]:
    """Indices of the records whose image decodes (storing them as a side effect), and {id: reason} of the others."""
    with_path = [i for i, r in enumerate(records) if r.image_path is not None]
    paths = [records[i].image_path for i in with_path]
    reasons = {r.id: "no image" for r in records if r.image_path is None}
    if not paths:
        return [], reasons
    rows, failures = open_store(paths, size, interpolation, store, progress=progress).lookup(paths)
    keep = [i for i, row in zip(with_path, rows.tolist()) if row >= 0]
    reasons.update({records[i].id: failures[records[i].image_path] for i, row in zip(with_path, rows.tolist()) if row < 0})
    return keep, reasons
