"""Two clipmed commands writing into one folder: the second is refused with one line naming the first."""

from __future__ import annotations

import subprocess
import sys
import time

from clipmed.cli import main
from clipmed.locking import LOCK_NAME
from reliability_helpers import error_line, kill, start_clipmed


def test_a_second_command_into_a_folder_in_use_is_refused(synthetic_dataset, tiny_dual_folder, tmp_path, capsys):
    out = tmp_path / "out"
    reproduce = ["reproduce", "--data", str(synthetic_dataset), "--out", str(out), "--model", str(tiny_dual_folder),
                 "--min-class-count", "5", "--epochs", "1", "--batch-size", "8", "--precision", "fp32"]
    first = start_clipmed(*reproduce, log=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first reproduce never locked its folder"
            time.sleep(0.05)
        holder = f"locked by process {first.pid} on this host (reproduce)"
        assert main(reproduce) == 2
        assert holder in error_line(capsys)
        assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out",
                     str(out)]) == 2
        assert holder in error_line(capsys)
    finally:
        kill(first)


def test_index_refuses_a_folder_another_process_writes(synthetic_dataset, tiny_dual_folder, tmp_path, capsys):
    out = tmp_path / "index"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom clipmed.locking import FileLock\n"
                               "with FileLock(sys.argv[1], what='index'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["index", "--model", str(tiny_dual_folder), "--data", str(synthetic_dataset), "--out",
                     str(out)]) == 2
        assert f"locked by process {holder.pid} on this host (index)" in error_line(capsys)
        assert not (out / "index.json").exists()
    finally:
        kill(holder)
