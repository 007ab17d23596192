"""clipmed's one cache folder: the image store, embedding caches and locked-tower features live under it.

The root is `$CLIPMED_CACHE`, else `~/.cache/clipmed`. Each kind of cached thing has its own sub-folder, and each
entry is named by a digest of everything that determines its content (`cache_key`), so two runs that need the
same thing share it and a change to any input gives a new entry instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """`$CLIPMED_CACHE`, else `~/.cache/clipmed` (not created)."""
    return Path(os.environ.get("CLIPMED_CACHE") or "~/.cache/clipmed").expanduser()


def cache_key(*parts: Any, length: int = 32) -> str:
    """A hex digest of the parts (JSON-encoded with sorted keys, so dicts and lists are stable)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def cache_dir(kind: str, *parts: Any, root: str | os.PathLike | None = None) -> Path:
    """The folder for one cache entry of `kind` (e.g. "store", "embeddings", "features"), keyed by `parts`.

    `root` overrides the cache root (e.g. `--store DIR`). The folder is not created: writers create it under a
    lock (`clipmed.locking.FileLock`) and publish their files atomically.
    """
    base = Path(root).expanduser() if root is not None else cache_root() / kind
    return base / cache_key(kind, *parts)
