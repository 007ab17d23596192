"""clipmed.locking.FileLock: one holder per folder, named in the refusal; stale locks taken over; re-entrant."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from clipmed.errors import ClipmedError
from clipmed.locking import LOCK_NAME, FileLock


def _write_lock(folder, *, pid: int, host: str | None = None, what: str = "train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "what": what,
                                                "since": time.time()}))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_file_names_the_holder_and_goes_with_the_block(tmp_path):
    with FileLock(tmp_path, what="index") as lock:
        holder = lock.holder()
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["what"] == "index"
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_is_refused_with_its_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid, what="train")
        with pytest.raises(ClipmedError) as refused:
            FileLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"process {sleeper.pid} on this host (train)" in message and str(tmp_path / LOCK_NAME) in message
        assert "\n" not in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid  # the holder keeps its lock
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_of_another_host_is_never_broken(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere.example")
    with pytest.raises(ClipmedError, match="on host elsewhere.example"):
        FileLock(tmp_path).acquire()


def test_a_stale_lock_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    with FileLock(tmp_path, what="prepare") as lock:
        assert lock.holder()["pid"] == os.getpid() and lock.holder()["what"] == "prepare"
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with FileLock(tmp_path, what="reproduce"):
        with FileLock(tmp_path, what="train"):  # a library call inside a command that already locked
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()  # the inner release keeps the outer lock
        assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "reproduce"
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(ValueError):
        with FileLock(tmp_path):
            raise ValueError("failed half-way")
    assert not (tmp_path / LOCK_NAME).exists()
    with FileLock(tmp_path):  # and can be taken again
        pass


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom clipmed.locking import FileLock\n"
                               "with FileLock(sys.argv[1], what='index'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClipmedError, match=f"locked by process {holder.pid} on this host \\(index\\)"):
            FileLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()
    with FileLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
