"""The on-disk image store: every image decoded once, resized, and kept in shards that every later run reads.

An entry of the store holds the images of one collection (the folder its image files share) at one tower input
size, interpolation and format, under `clipmed.cache.cache_dir("store", ...)` (`$CLIPMED_CACHE/store/<key>`, or
`--store DIR`). Each image is resized so that its shorter side is the tower's input size, aspect kept (the
rounding of `resize_shorter`), and encoded losslessly as PNG (default) or as JPEG q95: a centre crop at read time
gives exactly the pixels decoding the file would, and augmentation has the whole image to crop from.

Layout of an entry: `store.json` (size, interpolation, format) and shards `shard-NNNNNN.data` (the encoded images
back to back) with `shard-NNNNNN.npz` (per image: a 64-bit key of its path, byte offset and length; the images
that failed to decode with the reason). A shard's index is written after its data, each atomically, so an index
on disk names a complete shard: a killed build keeps every finished shard and the next build adds the rest.
Builds hold the entry's lock (`clipmed.locking.FileLock`); readers need none, since shards never change.
The index of a million images is ~24 MB of numpy arrays and loads in well under a second; no file is stat'ed.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..cache import cache_dir
from ..errors import ClipmedError
from ..io import atomic_write, read_json, write_json_atomic
from ..locking import FileLock
from ..processes import pool_context, worker_init
from .images import ImageError, open_rgb

INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
FORMATS = ("png", "jpeg")
STORE_VERSION = 1
SHARD_IMAGES = 1024  # images per shard at most: few files for a million images
SHARDS_PER_WORKER = 4  # at least, where the build is small: no worker idles while another finishes a long shard


@dataclass(frozen=True)
class StoreOptions:
    """Where the store lives and how it is built. root: a folder replacing `$CLIPMED_CACHE/store` (`--store`);
    format: png (lossless) or jpeg (q95, about a third of the size); workers: build processes (None: one per core)."""

    root: str | None = None
    format: str = "png"
    workers: int | None = None


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Shorter side to `size`, aspect kept (neither side below `size`)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return image.resize((new_w, new_h), INTERPOLATION[interpolation])


def path_keys(paths: Sequence[str]) -> np.ndarray:
    """uint64 keys of image paths (the first 8 bytes of their BLAKE2b digest; collisions ~1e-8 at a million)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") for p in paths),
                       dtype=np.uint64, count=len(paths))


def collection(paths: Sequence[str]) -> str:
    """The folder every path lies in (their longest common directory): names the collection a store entry holds."""
    if not paths:
        return ""
    prefix = os.path.commonprefix([min(paths), max(paths)])  # the common prefix of all: that of the extremes
    return prefix[: prefix.rfind(os.sep) + 1]


def _encode(image: Image.Image, fmt: str) -> bytes:
    pixels = np.asarray(image)
    if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all():
        image = Image.fromarray(np.ascontiguousarray(pixels[..., 0]))  # gray: a third of the bytes, same RGB back
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95, subsampling=0)  # 4:4:4: no chroma halving
    return buffer.getvalue()


def _build_shard(folder: str, number: int, paths: list[str], size: int, interpolation: str, fmt: str) -> int:
    """Decode, resize and encode `paths` into shard `number` (run in a worker process); returns len(paths)."""
    blobs, keys, failed, reasons = [], [], [], []
    for path in paths:
        try:
            blobs.append(_encode(resize_shorter(open_rgb(path), size, interpolation), fmt))
            keys.append(path)
        except ImageError as exc:
            failed.append(path)
            reasons.append(exc.reason)
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    stem = Path(folder) / f"shard-{number:06d}"

    def write_data(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            for blob in blobs:
                handle.write(blob)

    def write_index(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, keys=path_keys(keys), offsets=offsets, lengths=lengths, failed=path_keys(failed),
                     reasons=np.array(reasons, dtype=str))

    atomic_write(f"{stem}.data", write_data)
    atomic_write(f"{stem}.npz", write_index)  # last: an index names a complete shard
    return len(paths)


class ImageStore:
    """A store entry opened for reading: look up rows by image path, read a row's resized image.

    Row arrays are numpy (8 bytes of key, 4 of shard, 16 of offset/length per image): memory grows by a few dozen
    bytes per image, never by pixels. File handles open lazily per process, so a store passes to DataLoader workers.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta = read_json(self.folder / "store.json")
        self.size, self.interpolation, self.format = meta["size"], meta["interpolation"], meta["format"]
        self.shards = sorted(p.stem for p in self.folder.glob("shard-*.npz"))
        keys, shard, offsets, lengths, failed, reasons = [], [], [], [], [], []
        for number, stem in enumerate(self.shards):
            with np.load(self.folder / f"{stem}.npz") as index:
                keys.append(index["keys"])
                shard.append(np.full(len(index["keys"]), number, dtype=np.int32))
                offsets.append(index["offsets"])
                lengths.append(index["lengths"])
                failed.append(index["failed"])
                reasons.append(index["reasons"])
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        keys_all = cat(keys, np.uint64)
        order = np.argsort(keys_all, kind="stable")
        self._keys, self._shard = keys_all[order], cat(shard, np.int32)[order]
        self._offsets, self._lengths = cat(offsets, np.int64)[order], cat(lengths, np.int64)[order]
        failed_all = cat(failed, np.uint64)
        failed_order = np.argsort(failed_all, kind="stable")
        self._failed, self._reasons = failed_all[failed_order], cat(reasons, str)[failed_order]
        self._handles: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
        position = np.searchsorted(sorted_keys, keys).clip(max=max(len(sorted_keys) - 1, 0))
        found = (sorted_keys[position] == keys) if len(sorted_keys) else np.zeros(len(keys), dtype=bool)
        return np.where(found, position, -1)

    def lookup(self, paths: Sequence[str]) -> tuple[np.ndarray, dict[str, str]]:
        """Store rows of `paths` (int64, -1 where absent or unreadable) and {path: reason} of the unreadable ones."""
        keys = path_keys(paths)
        rows = self._find(self._keys, keys)
        failed = self._find(self._failed, keys)
        return rows, {paths[i]: str(self._reasons[failed[i]]) for i in np.flatnonzero(failed >= 0)}

    def missing(self, paths: Sequence[str]) -> list[str]:
        """The distinct paths the store has neither an image nor a failure for."""
        keys = path_keys(paths)
        absent = (self._find(self._keys, keys) < 0) & (self._find(self._failed, keys) < 0)
        return list(dict.fromkeys(paths[i] for i in np.flatnonzero(absent)))

    def image(self, row: int) -> Image.Image:
        """The stored (resized, uncropped) RGB image of row `row`."""
        if self._pid != os.getpid():  # a forked worker must not share its parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        shard = int(self._shard[row])
        if shard not in self._handles:
            self._handles[shard] = os.open(self.folder / f"{self.shards[shard]}.data", os.O_RDONLY)
        blob = os.pread(self._handles[shard], int(self._lengths[row]), int(self._offsets[row]))
        with Image.open(io.BytesIO(blob)) as image:
            return image.convert("RGB")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_pid": -1}


def store_folder(paths: Sequence[str], size: int, interpolation: str, options: StoreOptions) -> Path:
    """The store entry for these images: keyed by their collection, size, interpolation and format."""
    if options.format not in FORMATS:
        raise ClipmedError(f"unknown store format {options.format!r}: use one of {', '.join(FORMATS)}")
    return cache_dir("store", STORE_VERSION, collection(paths), size, interpolation, options.format, root=options.root)


def open_store(paths: Sequence[str], size: int, interpolation: str = "bicubic", options: StoreOptions = StoreOptions(),
               *, progress: bool = False) -> ImageStore:
    """The store entry holding `paths`, building the images it lacks first (in parallel, under the entry's lock).

    A concurrent build of the same entry (another run, another rank) is waited for, then only what it left
    missing is built.
    """
    folder = store_folder(paths, size, interpolation, options)
    if (folder / "store.json").is_file():
        store = ImageStore(folder)
        if not store.missing(paths):
            return store
    with wait_lock(folder, what="image store build"):
        if not (folder / "store.json").is_file():
            write_json_atomic(folder / "store.json", {"size": size, "interpolation": interpolation,
                                                      "format": options.format, "version": STORE_VERSION})
        for stale in folder.glob(".shard-*.tmp"):  # temporaries of a killed build
            stale.unlink(missing_ok=True)
        store = ImageStore(folder)
        missing = store.missing(paths)
        if missing:
            first = int(store.shards[-1].split("-")[1]) + 1 if store.shards else 0
            _build(folder, missing, first, size, interpolation, options, progress)
            store = ImageStore(folder)
    return store


def shard_chunks(paths: list[str], workers: int) -> list[list[str]]:
    """The images of each new shard: SHARD_IMAGES at most, fewer where a small build would otherwise leave a
    worker idle (at least SHARDS_PER_WORKER shards per worker)."""
    size = SHARD_IMAGES if workers <= 1 else max(1, min(SHARD_IMAGES, -(-len(paths) // (SHARDS_PER_WORKER * workers))))
    return [paths[i:i + size] for i in range(0, len(paths), size)]


def _build(folder: Path, paths: list[str], first: int, size: int, interpolation: str, options: StoreOptions,
           progress: bool) -> None:
    workers = options.workers or os.cpu_count() or 1
    chunks = shard_chunks(paths, workers)
    workers = min(workers, len(chunks))
    bar = tqdm(total=len(paths), desc="image store", unit="img", disable=None if progress else True)
    if workers <= 1:
        for number, chunk in enumerate(chunks, start=first):
            bar.update(_build_shard(str(folder), number, chunk, size, interpolation, options.format))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(), initializer=worker_init()) as pool:
            futures = [pool.submit(_build_shard, str(folder), number, chunk, size, interpolation, options.format)
                       for number, chunk in enumerate(chunks, start=first)]
            for future in as_completed(futures):
                bar.update(future.result())
    bar.close()


class wait_lock:
    """`with wait_lock(folder):` a cache entry's FileLock, waiting while another live process on this host holds it
    (it is filling the same entry: the waiter then finds the work done). A stale lock is taken over."""

    def __init__(self, folder: Path, *, what: str, poll_s: float = 1.0) -> None:
        self.lock, self.poll_s = FileLock(folder, what=what), poll_s

    def __enter__(self) -> FileLock:
        while True:
            try:
                return self.lock.acquire()
            except ClipmedError:
                holder = self.lock.holder()
                if holder is None or holder.get("host") != socket.gethostname():
                    raise
                time.sleep(self.poll_s)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
