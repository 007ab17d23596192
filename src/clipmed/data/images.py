"""Open any image file safely and return 8-bit RGB, or say in a few words why it cannot be used.

Every layer that reads pixels goes through `open_rgb`, so a figure decodes the same way in `prepare`
(validation), training and evaluation. Conversions, chosen once here:

- grayscale `L`/`1` and `CMYK`/`YCbCr`/`LAB`/`HSV`: PIL's own conversion to RGB;
- 16-bit and 32-bit grayscale (`I;16*`, `I`, `F`, e.g. DICOM-derived PNGs that use only part of the
  16-bit range): scaled linearly from the image's real minimum..maximum to 0..255, so a scan stored in
  0..4095 does not turn out almost black; a flat image keeps its values clipped to 0..255;
- images with transparency (`RGBA`, `LA`, `PA`, `P` with a transparency entry) are composited on black,
  the background of almost every radiograph, CT and MRI figure, so transparent margins look like the
  margins of the scan rather than like bright borders.

PIL's `LOAD_TRUNCATED_IMAGES` stays False: a truncated JPEG is rejected, never padded with grey.

`ImageChecks` checks many files in worker processes, in checkpointed chunks (prepare's validation).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipmed.errors import ClipmedError
from clipmed.io import read_json, write_json_atomic
from clipmed.processes import pool_context, worker_init

# PIL's own default limit (about 89.5 million pixels, a 1 GiB RGB buffer / 3 / 4).
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# Silencing PIL's decompression-bomb warning (clipmed's own limit replaces it) needs
# warnings.catch_warnings, which is process-global; the lock keeps our threads from interleaving it.
_HEADER_LOCK = threading.Lock()


class ImageError(ClipmedError):
    """An image that cannot be used; `reason` is the short form written to rejected.jsonl."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(str(path), reason)  # both in args, so the error pickles across processes
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def open_rgb(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `path` and return it as an 8-bit RGB image (see the module docstring for how).

    Raises ImageError (a ClipmedError) with a short reason for a missing, empty, non-image, truncated,
    corrupt or too large file. `max_pixels` guards against decompression bombs before any pixel is
    decoded; PIL's own hard limit (twice PIL.Image.MAX_IMAGE_PIXELS) still applies above it.
    """
    if not os.path.exists(path):
        raise ImageError(path, "missing file")
    if not os.path.isfile(path):
        raise ImageError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "zero-byte file")
    try:
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large: {exc}") from None
    except OSError as exc:  # e.g. permission denied, or a header that ends early
        raise ImageError(path, f"truncated or corrupt image: {exc}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(path, f"image too large: {width}x{height}")
        try:
            img.load()
            return _to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"image too large: {exc}") from None
        except MemoryError:
            raise
        # PIL signals bad data with OSError (truncated), SyntaxError/ValueError (bad headers or
        # chunks) and struct/zlib errors; all of them mean the same thing for us.
        except Exception as exc:
            raise ImageError(path, f"truncated or corrupt image: {exc}") from None


def check_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Return why `path` cannot be used as an image (a short reason), or None when it decodes fully."""
    try:
        open_rgb(path, max_pixels=max_pixels)
    except ImageError as exc:
        return exc.reason
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()  # a copy outlives the closed file handle
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_8bit(img)
    if mode == "P":
        # A palette entry marked transparent only shows up as alpha after conversion to RGBA.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def check_files(paths: Sequence[str], decode: bool = True) -> list[str | None]:
    """`check_image` for each path, or with `decode` False only that it is a non-empty regular file."""
    return [check_image(path) if decode else _stat_fault(path) for path in paths]


def _stat_fault(path: str) -> str | None:
    if not os.path.isfile(path):
        return "missing file" if not os.path.exists(path) else "not a regular file"
    return "zero-byte file" if os.path.getsize(path) == 0 else None


def default_workers() -> int:
    """Processes for image checks: one per core (decoding is CPU-bound, each process decodes one image at a time)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ImageChecks:
    """Check many images in chunks of `chunk` paths, in `workers` processes, results in submission order.

    With a `checkpoints` folder each decoded chunk's results are written there atomically (the chunk's paths
    beside its faults), and a chunk whose file holds the same paths is not checked again: a killed prepare
    resumes where it stopped. `add` and `finish` yield (tokens, faults) per finished chunk, tokens being what
    the caller passed with each path.
    """

    def __init__(self, *, decode: bool = True, workers: int = 1, checkpoints: Path | None = None,
                 chunk: int = 1024) -> None:
        if workers < 1:
            raise ClipmedError(f"--workers must be at least 1, not {workers}")
        self.decode, self.chunk = decode, chunk
        self.checkpoints = checkpoints if decode else None  # existence checks cost less than their checkpoint
        self.workers = workers if decode else 1
        self._pool: ProcessPoolExecutor | None = None  # started with the first full chunk: small sets need none
        self._ahead = 2 * workers
        self._tokens: list[Any] = []
        self._paths: list[str] = []
        self._queue: deque[tuple[list[Any], list[str], int, Future | list[str | None]]] = deque()
        self._number = 0

    def add(self, token: Any, path: str) -> Iterator[tuple[list[Any], list[str | None]]]:
        self._tokens.append(token)
        self._paths.append(path)
        if len(self._paths) >= self.chunk:
            if self._pool is None and self.workers > 1:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=pool_context(),
                                                 initializer=worker_init())
            self._submit()
        yield from self._drain(wait=len(self._queue) > self._ahead)

    def finish(self) -> Iterator[tuple[list[Any], list[str | None]]]:
        if self._paths:
            self._submit()
        while self._queue:
            yield from self._drain(wait=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ImageChecks":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _submit(self) -> None:
        tokens, paths, number = self._tokens, self._paths, self._number
        self._tokens, self._paths, self._number = [], [], number + 1
        done: Future | list[str | None] | None = self._checkpointed(number, paths)
        if done is None and self._pool is not None:
            done = self._pool.submit(check_files, paths, self.decode)
        elif done is None:
            done = check_files(paths, self.decode)
            self._save(number, paths, done)
        self._queue.append((tokens, paths, number, done))

    def _drain(self, *, wait: bool) -> Iterator[tuple[list[Any], list[str | None]]]:
        while self._queue:
            tokens, paths, number, done = self._queue[0]
            if isinstance(done, Future):
                if not (wait or done.done()):
                    return
                done = done.result()
                self._save(number, paths, done)
            self._queue.popleft()
            wait = False
            yield tokens, done

    def _checkpointed(self, number: int, paths: list[str]) -> list[str | None] | None:
        if self.checkpoints is None:
            return None
        try:
            saved = read_json(self.checkpoints / f"{number:06d}.json")
        except (OSError, ValueError):
            return None
        return saved["faults"] if saved.get("paths") == paths else None

    def _save(self, number: int, paths: list[str], faults: list[str | None]) -> None:
        if self.checkpoints is not None:
            write_json_atomic(self.checkpoints / f"{number:06d}.json", {"paths": paths, "faults": faults})
