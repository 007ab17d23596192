"""PeakMemory: the peak memory a run reports in run.json, its own and its loader workers'."""

from __future__ import annotations

import mmap
import subprocess
import sys
import time

import numpy as np

from clipmed.training.memory import MIB, PeakMemory, tree_memory

BLOCK = 256 * MIB


def test_an_allocation_made_and_freed_inside_is_its_peak():
    with PeakMemory(interval=0.02) as memory:
        start = tree_memory()
        # Mapped and unmapped directly, so that freeing it returns it whatever the allocator keeps
        # (clipmed.processes.keep_freed_memory).
        mapped = mmap.mmap(-1, BLOCK)
        np.frombuffer(mapped, dtype=np.uint8)[:] = 1  # written: resident, not just reserved
        time.sleep(0.2)
        mapped.close()
    assert memory.figures()["peak_memory_mib"] * MIB >= start + 0.9 * BLOCK
    assert tree_memory() < start + 0.5 * BLOCK  # freed: the figure is the peak, not the memory at the end


def test_a_child_process_counts_like_a_loader_worker():
    child = (f"import numpy as np, time, sys; b = np.ones({BLOCK}, dtype=np.uint8); "
             "print('ready', flush=True); time.sleep(0.5)")
    with PeakMemory(interval=0.02) as memory:
        alone = tree_memory()
        worker = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        worker.wait()
    assert memory.figures()["peak_memory_mib"] * MIB >= alone + 0.9 * BLOCK
