"""How clipmed starts worker processes (image checks, store builds, DataLoader workers), and how a command's
process allocates memory: one place decides.

No worker is forked from the command's own process. Such a worker would map every page the command holds (the
model, the optimizer, the dataset's rows): its resident memory would count all of them again, and Python's
reference counting would copy the pages it touches, so memory would grow with the dataset in every worker.
Instead, pool workers (image checks, store builds: PIL and numpy) are spawned, fresh interpreters that import only
what their function needs; DataLoader workers, which need torch, are forked from a small forkserver that imported
clipmed's data modules once (where forkserver does not exist, Windows, they are spawned too). As with any spawned
worker, a script that starts clipmed's workers guards its top level with `if __name__ == "__main__":`.

A forkserver's child has the server, not the command, as its parent, so torch's own check (a DataLoader worker
exits when its parent pid changes) never fires: every worker here also watches the command that started it and
exits when it is gone, so a killed run leaves no workers (nor the server they keep open) behind.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
import time
from multiprocessing.context import BaseContext
from typing import Callable

import psutil

# What the forkserver imports once, before it forks each DataLoader worker: the datasets those workers run.
PRELOAD = ["clipmed.data.datasets"]
WATCH_S = 1.0  # how often a worker checks that the command that started it still runs


def pool_context() -> BaseContext:
    """The multiprocessing context of clipmed's process pools (image checks, store builds)."""
    return multiprocessing.get_context("spawn")


def loader_context() -> BaseContext:
    """The multiprocessing context of clipmed's DataLoader workers."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_loader_server() -> None:
    """Start the DataLoader workers' forkserver now, without waiting for it: it imports torch while the command
    loads its model, so the first loader does not wait for that import."""
    if loader_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def worker_init() -> Callable[..., None]:
    """The initializer every worker runs first (a DataLoader's worker_init_fn, a pool's initializer): it exits
    the worker when this process, the one starting it, is gone."""
    me = psutil.Process()
    return functools.partial(_exit_with, me.pid, me.create_time())


def _exit_with(pid: int, created: float, *_worker_id: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            try:
                alive = psutil.Process(pid).create_time() == created  # the same process, not a reused pid
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                os._exit(0)

    threading.Thread(target=watch, name="clipmed-parent-watch", daemon=True).start()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = 1 << 30  # bytes: allocations below this come from the heap, and freed heap memory stays mapped


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc maps each block over 32 MB afresh and unmaps it when freed, so every training or embedding
    step page-faults (and the kernel zeroes) all its large activations again: a system-time cost on every CPU
    kind. With the heap kept, a step reuses the previous step's pages; the peak memory is the same, it is only
    not handed back between steps (`bench/allocator.py` times both). Returns whether it applied (glibc on
    Linux, and `CLIPMED_MALLOC` not set to "system", which keeps glibc's default)."""
    if os.environ.get("CLIPMED_MALLOC", "keep") == "system":
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_FREED))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc's malloc_trim), whatever `keep_freed_memory` set.

    Training repeats one step's shapes, so keeping its freed memory pays; a long inference pass (`embed`,
    `index`) also frees per-chunk results between the steps' activations, and the kept heap then fragments and
    grows with the rows. Calling this once per chunk bounds it. Returns whether glibc trimmed anything."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library where it is glibc on Linux, else None (macOS, Windows, musl); loaded once."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return None
    return libc if hasattr(libc, "malloc_trim") else None
