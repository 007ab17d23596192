"""Small file helpers shared by every layer: atomic writes and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import ClipmedError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file through a temporary sibling, fsync it, then rename it into place.

    `write` receives the temporary path and must fill it. A crash at any moment leaves either the old
    file or the new one on disk, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and some writers replace the file): give it the permissions a plain open()
        # would, 0666 less the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output(path: str | os.PathLike, *, folder: bool, flag: str = "--out") -> Path:
    """Refuse an output path that cannot be written, before a command does any work: a file where a folder is
    wanted or the reverse, a path under a file, or a folder this user cannot write in (probed by creating a
    nameless temporary file in the nearest existing folder). Every command calls this for each path it writes."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ClipmedError(f"{flag} {path} is a file, not a folder: give a new or existing folder")
    if not folder and path.is_dir():
        raise ClipmedError(f"{flag} {path} is a folder: give a file path, e.g. {path / 'metrics.json'}")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ClipmedError(f"{flag} {path}: {existing} is a file, so nothing can be written under it; give another "
                           f"{flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ClipmedError(f"{flag} {path}: cannot write in {existing} ({exc.strerror or type(exc).__name__}): give "
                           f"a {flag} in a folder you can write") from None
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of one file's bytes (hex)."""
    digest = hashlib.sha256()
    _hash_into(digest, path, chunk)
    return digest.hexdigest()


def fingerprint_files(paths: list[str | os.PathLike], chunk: int = 1 << 20) -> str:
    """SHA-256 over the bytes of the given files, in order; names the exact data a split came from."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(Path(path).name).encode())
        _hash_into(digest, path, chunk)
    return digest.hexdigest()


def _hash_into(digest: Any, path: str | os.PathLike, chunk: int) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
