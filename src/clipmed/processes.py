"""How clipmed starts worker processes (image checks, store builds, DataLoader workers): one place decides.

Workers are forked from a small forkserver process that has imported only clipmed's data modules (torch, numpy,
PIL), never from the command's own process. A worker forked from the command would map every page the command
holds (the model, the optimizer, the dataset's rows): its resident memory would count all of them again, and
Python's reference counting would copy the pages it touches, so memory would grow with the dataset in every
worker. Where forkserver does not exist (Windows) workers are spawned, fresh interpreters likewise.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

# What the forkserver imports once, before it forks each worker: every function a worker runs lives there.
PRELOAD = ["clipmed.data.datasets"]


def worker_context() -> BaseContext:
    """The multiprocessing context of every clipmed worker pool and DataLoader."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
