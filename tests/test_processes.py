"""Every worker pool starts its processes from the forkserver, never by forking the command's own process, and a
killed command leaves no worker behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from clipmed.data.datasets import FileImages, loader
from clipmed.processes import PRELOAD, loader_context

pytestmark = pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                                reason="no forkserver here")


def test_loader_workers_come_from_a_forkserver_that_preloads_the_data_modules():
    context = loader_context()
    assert context.get_start_method() == "forkserver" and PRELOAD == ["clipmed.data.datasets"]
    assert loader(FileImages([], 8, "bicubic"), [[0]], workers=1).multiprocessing_context is context
    assert loader(FileImages([], 8, "bicubic"), [[0]], workers=0).multiprocessing_context is None  # in-process


def test_a_killed_command_leaves_no_loader_worker_nor_forkserver_behind(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from clipmed.data.datasets import FileImages, loader

        if __name__ == "__main__":
            batches = iter(loader(FileImages([{str(image)!r}] * 64, 8, "bicubic"), [[i] for i in range(64)],
                                  workers=2))
            next(batches)
            print("reading", flush=True)
            time.sleep(600)
    """))
    reader = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert reader.stdout.readline().strip() == "reading"
        helpers = psutil.Process(reader.pid).children(recursive=True)  # the forkserver, its workers, the tracker
        assert len(helpers) >= 3
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        _, alive = psutil.wait_procs(helpers, timeout=20)
        assert not alive, f"still running after the kill: {[p.cmdline()[-1][:80] for p in alive]}"
    finally:
        reader.kill()


ALLOCATE_TWICE = """
import resource, sys
import numpy as np
from clipmed.processes import keep_freed_memory

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
start = rss()
np.ones(64 * 2**20 // 8).sum()  # 64 MiB: over glibc's default mmap threshold, freed at once
kept = rss() - start
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 * 2**20 // 8).sum()
print(applied, kept // 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_serves_the_next_large_allocation_without_page_faults():
    runs = {mode: subprocess.run([sys.executable, "-c", ALLOCATE_TWICE, mode], capture_output=True, text=True,
                                 check=True).stdout.split() for mode in ("keep", "system")}
    assert runs["keep"][0] == "True" and runs["system"][0] == "False"
    assert int(runs["system"][1]) < 16  # glibc's default unmapped the freed block: the next one faults afresh
    assert int(runs["keep"][1]) > 48 and int(runs["keep"][2]) < 100  # kept: the freed pages serve the next one


RELEASE_KEPT = """
import numpy as np
from clipmed.processes import keep_freed_memory, release_freed_memory

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

keep_freed_memory()
start = rss()
np.ones(64 * 2**20 // 8).sum()
kept = rss() - start
released = release_freed_memory()
print(kept // 2**20, released, (rss() - start) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_released_memory_leaves_the_process_even_with_the_heap_kept():
    kept, released, after = subprocess.run([sys.executable, "-c", RELEASE_KEPT], capture_output=True, text=True,
                                           check=True).stdout.split()
    assert int(kept) > 48 and released == "True" and int(after) < 16


def test_clipmed_malloc_system_keeps_glibcs_default(monkeypatch):
    from clipmed.processes import keep_freed_memory

    monkeypatch.setenv("CLIPMED_MALLOC", "system")
    assert keep_freed_memory() is False
