"""Peak memory of a training run, for run.json: users compare methods (LoRA, accumulation, checkpointing) by it.

`ru_maxrss` is the peak of the whole process's life, so a second run in one process (reproduce) would report the
first one's peak; a sampler thread instead records the largest memory of this process and its children (the
loader workers) while the run trains. Memory is the proportional set size (PSS): a page shared by several processes
counts a share in each, so forked loader workers, which share the parent's libraries and weights, are not counted
twice as summed RSS would (resident RSS where the platform has no PSS). On CUDA, torch's own peak of allocated
bytes is reported beside it.
"""

from __future__ import annotations

import threading

import psutil
import torch

SAMPLE_S = 0.2
MIB = 1024 * 1024


def _memory(process: psutil.Process) -> int:
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):  # no PSS on this platform
        return process.memory_info().rss


def tree_memory() -> int:
    """Bytes (PSS) of this process and all its children."""
    me = psutil.Process()
    total = _memory(me)
    for child in me.children(recursive=True):
        try:
            total += _memory(child)
        except psutil.Error:  # a worker that exited between the listing and the read
            pass
    return total


class PeakMemory:
    """A context manager: `.figures()` gives the peak memory (PSS, MiB) seen while it was open, sampled every
    `interval` seconds and once at the start and end, plus the CUDA peak where `device` is a GPU."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = SAMPLE_S) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="clipmed-peak-memory")

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_memory())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = tree_memory()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory())

    def figures(self) -> dict:
        """{"peak_memory_mib": ..., "peak_cuda_mib": ... (GPU runs only)} as far as sampled so far."""
        figures = {"peak_memory_mib": round(max(self.peak, tree_memory()) / MIB, 1)}
        if self.device.type == "cuda":
            figures["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(self.device) / MIB, 1)
        return figures
