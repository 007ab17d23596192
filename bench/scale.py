"""Scale: time and memory of prepare, the image store, training, index and embed as the dataset grows.

    python bench/scale.py                      # 2.6k, 26k, 52k rows, a 1024-px 2.6k set, 1M metadata-only rows
    python bench/scale.py --quick              # the same steps at 300 / 600 rows (all workers only): minutes

Every step runs the CLI a user runs (`python -m clipmed.cli ...`, this checkout's sources) in a subprocess.
Memory is the summed RSS of that process and all its children (loader and build workers), sampled every 0.2 s
with psutil; the peak is reported. Beside it, the sum over those processes of each one's high-water mark (VmHWM,
which the kernel keeps between samples): an upper bound of the summed peak that a 0.2 s sample cannot miss,
so it varies far less from run to run (a training step's activations come and go within a second). The datasets are synthetic imagefolders in a scratch folder outside the repo
(`--scratch`): roco-radiology's images hard-linked under new names (never copied), one set re-encoded at a
PubMedVision-like size (~1024 px long side, real new files, to show decode cost), and a metadata-only set whose
rows name the roco images in place (the 1M-row manifest path: prepare --no-image-check). Each set is built once
and reused by later runs of the bench; the caches (image store, features) live in the scratch folder too.

For each set: prepare wall time and peak memory (all workers; on the smallest set also 1 worker); image store
build time with all workers and, on the smallest set, with 1 (where train has --store: training builds the store before its first
step, so the build is the time to a first step into a fresh store less that once the store exists); time from
launch to the first training step once the store exists; steady training pairs/s (median over the steps after
the first few); data-wait share (metrics.csv's data_wait_s, where logged); peak memory of a fixed-step training
run, of `index` and of `embed` (those two at --index-sizes: by default the smallest and largest N). Then the
evaluation metrics at scale on random embeddings: zero-shot intervals of 100k rows, retrieval of 20k pairs.

Targets, checked and printed (on a shared machine the speed figures are only indicative: the JSON records the
load average before and after):
- peak memory of training, index and embed grows <= 1 KB per added row (smallest -> largest N) and the
  largest-N figure is <= 1.2x the smallest;
- steady pairs/s at the largest N within 10% of the smallest;
- time to the first step at the largest N <= 30 s once the store exists;
- prepare and store build linear in N: the marginal seconds per 1k rows of the second size step within 25%
  of the first; all workers (2 or more) >= 1.6x one;
- the 1M-row metadata-only prepare under 5 min and 4 GB.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ROCO, print_table, write_results  # noqa: E402
from synthetic_metadata import write_synthetic_metadata  # noqa: E402

KB, MB = 1024, 1024 * 1024
SAMPLE_S = 0.2
# one_worker: also time prepare with 1 worker on every hard-linked set, and the store build with 1 worker on the
# smallest (the quick mode only checks
# the steps run).
FULL = {"sizes": [2626, 26260, 52520], "large": 2626, "metadata_rows": 1_000_000, "train_steps": 40,
        "batch_size": 32, "one_worker": True, "metric_rows": 100_000, "retrieval_pairs": 20_000}
QUICK = {"sizes": [300, 600], "large": 60, "metadata_rows": 20_000, "train_steps": 5, "batch_size": 16,
         "one_worker": False, "metric_rows": 10_000, "retrieval_pairs": 2_000}
LARGE_SIDE = 1024
VAL_ROWS = 256  # --val-max-rows where the CLI has it: the end-of-run validation costs the same at every N
STEADY_SKIP = 3  # steps left out of the steady pairs/s (warm-up)


# ----------------------------------------------------------------------------------------------- measuring

def measure(command: list[str], *, env: dict, log: Path) -> dict:
    """Run one CLI command; wall seconds, peak summed RSS of its process tree (MiB), exit status.

    stdout and stderr go to `log` (kept for reading a failure); a failing command stops the bench."""
    peak = 0
    high_water: dict[int, int] = {}  # pid -> the kernel's high-water mark of its RSS, last read
    done = threading.Event()
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            nonlocal peak
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not done.is_set():
                total = 0
                try:
                    for process in [root, *root.children(recursive=True)]:
                        try:
                            total += process.memory_info().rss
                            high_water[process.pid] = max(high_water.get(process.pid, 0), _high_water(process.pid))
                        except psutil.NoSuchProcess:
                            pass
                except psutil.NoSuchProcess:
                    break
                peak = max(peak, total)
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({returncode}): {' '.join(command)}\n{tail}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / MB, 1),
            "hwm_sum_mib": round(sum(high_water.values()) / MB, 1)}


def _high_water(pid: int) -> int:
    """VmHWM of a process (bytes): the peak of its RSS as the kernel counts it, between samples too."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KB
    except OSError:
        pass
    return 0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipmed.cli", *args]


class Cli:
    """What this checkout's CLI offers (read from --help), so the bench runs against the CLI as it is."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self._help: dict[str, str] = {}

    def help(self, *command: str) -> str:
        key = " ".join(command)
        if key not in self._help:
            done = subprocess.run(cli(*command, "--help"), env=self.env, capture_output=True, text=True)
            self._help[key] = done.stdout if done.returncode == 0 else ""
        return self._help[key]

    def has(self, command: str, flag: str) -> bool:
        return flag in self.help(command)


# ----------------------------------------------------------------------------------------------- datasets

def roco_rows() -> list[dict]:
    rows = [json.loads(line) for line in (ROCO / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if (ROCO / row["file_name"]).is_file()]


def _write_rows(folder: Path, rows) -> None:
    """metadata.jsonl last and by rename: a folder with one is complete."""
    temporary = folder / "metadata.jsonl.tmp"
    with open(temporary, "w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    temporary.replace(folder / "metadata.jsonl")


def _synthetic_row(source: dict, i: int, file_name: str, n_source: int) -> dict:
    """Row i: a copy of roco row i mod n; copy c's articles are new groups, so groups keep their sizes."""
    return {**source, "id": f"S{i:07d}", "file_name": file_name, "article": f"{source.get('article')}-{i // n_source}"}


def _needs_building(folder: Path) -> bool:
    """Whether a synthetic set must be (re)built: it has no metadata.jsonl (written last), so it is emptied and
    given a fresh images/ folder; a complete set is reused."""
    if (folder / "metadata.jsonl").is_file():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    return True


def linked_set(scratch: Path, n: int, source: list[dict]) -> Path:
    """n rows whose images are hard links to roco's (same inode, new names)."""
    folder = scratch / f"linked-{n}"
    if not _needs_building(folder):
        return folder
    rows = []
    for i in range(n):
        row = source[i % len(source)]
        name = f"images/S{i:07d}{Path(row['file_name']).suffix}"
        os.link(ROCO / row["file_name"], folder / name)
        rows.append(_synthetic_row(row, i, name, len(source)))
    _write_rows(folder, rows)
    return folder


def _reencode(job: tuple[str, str]) -> None:
    from PIL import Image

    src, dst = job
    with Image.open(src) as image:
        image = image.convert("RGB")
        scale = LARGE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        image.save(dst, quality=90)


def large_set(scratch: Path, n: int, source: list[dict]) -> Path:
    """n rows with their images re-encoded at ~1024 px long side (JPEG q90): new files, PubMedVision-like."""
    folder = scratch / f"large-{n}"
    if not _needs_building(folder):
        return folder
    rows, jobs = [], []
    for i in range(n):
        row = source[i % len(source)]
        name = f"images/L{i:07d}.jpg"
        jobs.append((str(ROCO / row["file_name"]), str(folder / name)))
        rows.append(_synthetic_row(row, i, name, len(source)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_reencode, jobs, chunksize=32))
    _write_rows(folder, rows)
    return folder


def metadata_set(scratch: Path, n: int) -> Path:
    """n rows naming roco's own images (prepared with --image-root at roco): the manifest path, no image work.
    Rewritten every run (seconds), so a killed write never passes for a complete file."""
    folder = scratch / f"metadata-{n}"
    write_synthetic_metadata(folder, n, template=ROCO / "metadata.jsonl")
    return folder


# ----------------------------------------------------------------------------------------------- steps

def prepare(tools: Cli, data: Path, out: Path, log: Path, *, workers: int | None, metadata_only: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = cli("prepare", str(data), "--out", str(out), "--group-field", "article", "--n", str(10 ** 9),
                  "--min-class-count", "5")
    if workers is not None:
        command += ["--workers", str(workers)]
    if metadata_only:  # images only checked to exist, where roco keeps them
        command += ["--no-image-check", "--image-root", str(ROCO)]
    return measure(command, env=tools.env, log=log)


def train(tools: Cli, prepared: Path, run: Path, log: Path, settings: dict, *, steps: int,
          store: Path | None = None, workers: int | None = None) -> dict:
    """A fixed-step caption run: peak memory, time from launch to the first step, steady pairs/s, data wait."""
    shutil.rmtree(run, ignore_errors=True)
    command = cli("train", "--data", str(prepared), "--out", str(run), "--objective", "caption", "--epochs", "1",
                  "--max-steps", str(steps), "--batch-size", str(settings["batch_size"]))
    if store is not None:
        command += ["--store", str(store)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if tools.has("train", "--val-max-rows"):
        command += ["--val-max-rows", str(VAL_ROWS)]
    result = measure(command, env=tools.env, log=log)
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    loop_s = json.loads((run / "run.json").read_text())["seconds"]  # train's loop, from its start to the end
    # Launch -> loop start is the wall time not spent in the loop (interpreter exit is the small rest).
    result["first_step_s"] = round(result["seconds"] - loop_s + float(rows[0]["elapsed_s"]), 2)
    steady = rows[STEADY_SKIP:] or rows
    result["pairs_per_s"] = round(statistics.median(float(r["pairs_per_s"]) for r in steady), 2)
    if "data_wait_s" in rows[0]:
        step_s = sum(settings["batch_size"] / float(r["pairs_per_s"]) for r in steady)
        result["data_wait_share"] = round(sum(float(r["data_wait_s"]) for r in steady) / step_s, 4)
    return result


def index(tools: Cli, model: Path, data: Path, out: Path, log: Path, store: Path | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = cli("index", "--model", str(model), "--data", str(data), "--out", str(out))
    return measure(command + (["--store", str(store)] if store else []), env=tools.env, log=log)


def embed(tools: Cli, model: Path, data: Path, out: Path, log: Path, store: Path | None) -> dict:
    out.unlink(missing_ok=True)
    command = cli("embed", "--model", str(model), "--data", str(data), "--out", str(out), "--what", "both")
    return measure(command + (["--store", str(store)] if store else []), env=tools.env, log=log)


def measure_set(tools: Cli, name: str, data: Path, rows: int, work: Path, settings: dict, *,
                with_index: bool, one_worker: bool, one_worker_store: bool) -> dict:
    """Every step on one dataset; returns its figures (absent where this CLI lacks the step). `one_worker`: also
    time prepare with a single worker; `one_worker_store`: the store build too (the all-workers speed-up)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {rows} rows", flush=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepared, run = work / f"prepared-{name}", work / f"run-{name}"
    cores = os.cpu_count() or 1
    store = None
    result: dict = {"rows": rows}
    if one_worker and tools.has("prepare", "--workers"):
        result["prepare_1_worker"] = prepare(tools, data, prepared, logs / f"{name}-prepare-1.log", workers=1)
    result["prepare"] = prepare(tools, data, prepared, logs / f"{name}-prepare.log",
                                workers=cores if tools.has("prepare", "--workers") else None)
    if tools.has("train", "--store"):
        # The store is built before the first step: its build time is a first step into a fresh store
        # (1 worker, then all) less the first step once it exists.
        cold = {}
        for workers in sorted({1, cores} if one_worker_store else {cores}):
            store = work / f"store-{name}-{workers}"
            shutil.rmtree(store, ignore_errors=True)
            cold[workers] = train(tools, prepared, run, logs / f"{name}-train-cold-{workers}.log", settings, steps=1,
                                  store=store, workers=workers)
        result["train"] = train(tools, prepared, run, logs / f"{name}-train.log", settings,
                                steps=settings["train_steps"], store=store)
        for workers, figures in cold.items():
            build = {"seconds": round(figures["first_step_s"] - result["train"]["first_step_s"], 2),
                     "peak_rss_mib": figures["peak_rss_mib"]}
            result["store_1_worker" if workers == 1 else "store"] = build
        result.setdefault("store", result.get("store_1_worker"))
    else:
        # Today's trainer decodes every image into RAM before the first step of every run.
        result["train"] = train(tools, prepared, run, logs / f"{name}-train.log", settings,
                                steps=settings["train_steps"])
    if with_index:  # the run's model, reading the store training built
        result["index"] = index(tools, run, data, work / f"index-{name}", logs / f"{name}-index.log", store)
        result["embed"] = embed(tools, run, data, work / f"embed-{name}.parquet", logs / f"{name}-embed.log", store)
    return result


METRICS_CHILD = """
import json, sys, time
import numpy as np
from clipmed.evaluation.metrics import classification_metrics, retrieval_metrics
rows, pairs, dim = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(0)
labels = rng.integers(0, 7, rows)
scores = (rng.normal(size=(rows, 7)) + 2 * np.eye(7)[labels]).astype(np.float32)
start = time.perf_counter()
classification_metrics(scores, labels, [str(c) for c in range(7)], n_boot=1000)
zero_shot = time.perf_counter() - start
images = rng.normal(size=(pairs, dim)).astype(np.float32)
texts = images + rng.normal(size=(pairs, dim)).astype(np.float32)
start = time.perf_counter()
retrieval_metrics(images, texts, image_labels=labels[:pairs], text_labels=labels[:pairs], n_boot=1000)
print(json.dumps({"zero_shot_s": round(zero_shot, 2), "retrieval_s": round(time.perf_counter() - start, 2)}))
"""


def evaluation_metrics(tools: Cli, work: Path, rows: int, pairs: int, dim: int = 256) -> dict:
    """Zero-shot metrics of `rows` test rows and retrieval of `pairs` image-text pairs, 1,000 resamples each:
    seconds and peak memory (never an N x N matrix)."""
    log = work / "logs" / "metrics.log"
    figures = measure([sys.executable, "-c", METRICS_CHILD, str(rows), str(pairs), str(dim)], env=tools.env, log=log)
    return {"zero_shot_rows": rows, "retrieval_pairs": pairs, "dim": dim, **figures,
            **json.loads(log.read_text().strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------------- targets

def _marginal(sets: list[dict], key: str) -> list[float] | None:
    """Seconds per 1k added rows between consecutive sizes."""
    if any(key not in s for s in sets):
        return None
    return [round((b[key]["seconds"] - a[key]["seconds"]) / ((b["rows"] - a["rows"]) / 1000), 3)
            for a, b in zip(sets, sets[1:])]


def targets(sets: list[dict], metadata: dict | None) -> list[dict]:
    """Each target: what it compares, the measured figure, the limit and whether it is met (None: not measured)."""
    small, large = sets[0], sets[-1]
    checks = []

    def check(name: str, value, limit, ok) -> None:
        checks.append({"target": name, "value": value, "limit": limit, "met": ok})

    for step in ("train", "index", "embed"):
        ran = [s for s in sets if step in s]
        if len(ran) < 2:
            check(f"{step} peak memory per added row", None, "<= 1 KB", None)
            continue
        first, last = ran[0], ran[-1]
        for field, what in (("peak_rss_mib", "sampled summed RSS"), ("hwm_sum_mib", "summed high-water marks")):
            if field not in first[step] or field not in last[step]:
                continue
            a, b = first[step][field], last[step][field]
            per_row = (b - a) * MB / (last["rows"] - first["rows"])
            span = f"{first['rows']} -> {last['rows']} rows"
            check(f"{step} {what} per added row, {span} (B)", round(per_row), "<= 1024", per_row <= KB)
            check(f"{step} {what}, {span}: ratio", round(b / a, 3), "<= 1.2", b / a <= 1.2)
    ratio = large["train"]["pairs_per_s"] / small["train"]["pairs_per_s"]
    check("steady pairs/s, largest / smallest N", round(ratio, 3), "0.9 .. 1.1", 0.9 <= ratio <= 1.1)
    first = large["train"]["first_step_s"]
    check("time to first step at the largest N, store built (s)", first, "<= 30", first <= 30)
    for step in ("prepare", "store"):
        marginal = _marginal(sets, step)
        if marginal is None or len(marginal) < 2:
            check(f"{step} linear in N (s per 1k rows, per size step)", marginal, "within 25%", None)
        else:
            stable = all(abs(m / marginal[0] - 1) <= 0.25 for m in marginal[1:]) if marginal[0] > 0 else False
            check(f"{step} linear in N (s per 1k rows, per size step)", marginal, "within 25%", stable)
        one = f"{step}_1_worker"
        if (os.cpu_count() or 1) < 2 or one not in small or step not in small:
            check(f"{step}: all workers / 1 worker", None, ">= 1.6", None)
            continue
        speedup = small[one]["seconds"] / small[step]["seconds"]
        check(f"{step}: all {os.cpu_count()} workers / 1 worker at {small['rows']} rows", round(speedup, 2),
              ">= 1.6", speedup >= 1.6)
        if one in large and large is not small:
            # The work each added row costs, start-up excluded (the start-up is most of a small set's time).
            per_row = ((large[one]["seconds"] - small[one]["seconds"])
                       / (large[step]["seconds"] - small[step]["seconds"]))
            check(f"{step}: all {os.cpu_count()} workers / 1 worker, marginal s per row {small['rows']} -> "
                  f"{large['rows']}", round(per_row, 2), ">= 1.6", per_row >= 1.6)
    if metadata is None:
        check("1M-row metadata-only prepare", None, "< 300 s and < 4 GB", None)
    else:
        p = metadata["prepare"]
        check(f"{metadata['rows']}-row metadata-only prepare (s, MiB)", [p["seconds"], p["peak_rss_mib"]],
              "< 300 s and < 4096 MiB", p["seconds"] < 300 and p["peak_rss_mib"] < 4096)
    return checks


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def _cell(figures: dict, key: str, field: str) -> str:
    value = figures.get(key, {}).get(field) if isinstance(figures.get(key), dict) else None
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="300 / 600 rows, all workers only (a few minutes): checks that every step runs")
    parser.add_argument("--out", help="results JSON (default: bench/results/scale.json; --quick: none)")
    parser.add_argument("--scratch", default=str(REPO.parent / "scratch" / "clipmed-scale"),
                        help="folder outside the repo for the synthetic datasets, runs and caches")
    parser.add_argument("--sizes", help="comma-separated row counts of the hard-linked sets, replacing the mode's")
    parser.add_argument("--train-steps", type=int, help="steps of each training run, replacing the mode's")
    parser.add_argument("--index-sizes", help="the sizes (of --sizes) that also run index and embed (default: the "
                                              "smallest and the largest)")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.sizes:
        settings["sizes"] = sorted(int(n) for n in args.sizes.split(","))
        if len(settings["sizes"]) < 2:
            raise SystemExit("--sizes needs at least two row counts (the targets compare the smallest and largest)")
    if args.train_steps:
        settings["train_steps"] = args.train_steps
    settings["index_sizes"] = (sorted(int(n) for n in args.index_sizes.split(",")) if args.index_sizes
                               else [settings["sizes"][0], settings["sizes"][-1]])
    if not set(settings["index_sizes"]) <= set(settings["sizes"]):
        raise SystemExit(f"--index-sizes {settings['index_sizes']} must be among --sizes {settings['sizes']}")
    out = args.out or (None if args.quick else str(REPO / "bench" / "results" / "scale.json"))
    scratch = Path(args.scratch).resolve()
    if scratch.is_relative_to(REPO):
        raise SystemExit(f"--scratch {scratch} lies inside the repo: choose a folder outside it")
    if not (ROCO / "metadata.jsonl").is_file():
        raise SystemExit(f"needs the roco-radiology images at {ROCO}")
    mode = "quick" if args.quick else "full"
    work = scratch / f"work-{mode}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "CLIPMED_CACHE": str(work / "cache"), "TQDM_DISABLE": "1"}
    tools = Cli(env)
    load_before = os.getloadavg()
    started = time.time()

    source = roco_rows()
    sets: list[dict] = []
    results = {"mode": mode, "settings": settings, "sets": sets, "complete": False, "cpu_model": _cpu_model(),
               "cpus": os.cpu_count(), "loadavg_before": list(load_before), "commit": _commit(),
               "memory": "peak summed RSS of the command's process tree, sampled every 0.2 s (psutil)"}

    def save(**figures) -> None:
        """Results so far (a stopped bench keeps its finished steps; "complete" says whether it ran to the end)."""
        results.update(figures, loadavg_after=list(os.getloadavg()), total_s=round(time.time() - started, 1))
        write_results(out, results)

    for i, n in enumerate(settings["sizes"]):
        data = linked_set(scratch, n, source)
        sets.append({"name": f"linked {n}",
                     **measure_set(tools, f"linked-{n}", data, n, work, settings,
                                   with_index=n in settings["index_sizes"],
                                   one_worker=settings["one_worker"],
                                   one_worker_store=settings["one_worker"] and i == 0)})
        save()
    large = large_set(scratch, settings["large"], source)
    large_figures = {"name": f"{LARGE_SIDE}px {settings['large']}",
                     **measure_set(tools, "large", large, settings["large"], work, settings, with_index=False,
                                   one_worker=False, one_worker_store=False)}
    save(large_images=large_figures)
    metadata = None
    if tools.has("prepare", "--no-image-check"):
        data = metadata_set(scratch, settings["metadata_rows"])
        print(f"[{time.strftime('%H:%M:%S')}] metadata-only prepare: {settings['metadata_rows']} rows", flush=True)
        metadata = {"name": f"metadata-only {settings['metadata_rows']}", "rows": settings["metadata_rows"],
                    "prepare": prepare(tools, data, work / "prepared-metadata", work / "logs" / "metadata.log",
                                       workers=None, metadata_only=True)}
        save(metadata_only=metadata)

    print(f"[{time.strftime('%H:%M:%S')}] evaluation metrics", flush=True)
    metrics = evaluation_metrics(tools, work, settings["metric_rows"], settings["retrieval_pairs"])
    checks = targets(sets, metadata)
    save(evaluation_metrics=metrics, targets=checks, complete=True)

    header = ["set", "rows", "prepare s", "prep MiB", "prep 1w s", "store s", "store 1w s", "1st step s",
              "pairs/s", "wait", "train MiB", "train HWM", "index MiB", "index HWM", "embed MiB", "embed HWM"]
    table = [[s["name"], s["rows"], _cell(s, "prepare", "seconds"), _cell(s, "prepare", "peak_rss_mib"),
              _cell(s, "prepare_1_worker", "seconds"), _cell(s, "store", "seconds"),
              _cell(s, "store_1_worker", "seconds"), _cell(s, "train", "first_step_s"),
              _cell(s, "train", "pairs_per_s"), _cell(s, "train", "data_wait_share"),
              *(_cell(s, step, field) for step in ("train", "index", "embed")
                for field in ("peak_rss_mib", "hwm_sum_mib"))]
             for s in [*sets, large_figures] + ([metadata] if metadata else [])]
    print_table(header, table)
    print()
    print_table(["target", "value", "limit", "met"],
                [[c["target"], json.dumps(c["value"]), c["limit"], {True: "yes", False: "NO", None: "n/a"}[c["met"]]]
                 for c in checks])
    print(f"\nzero-shot metrics of {metrics['zero_shot_rows']} rows {metrics['zero_shot_s']} s; retrieval of "
          f"{metrics['retrieval_pairs']} pairs {metrics['retrieval_s']} s; peak {metrics['peak_rss_mib']} MiB "
          "(1,000 resamples each)")
    print(f"\n{_cpu_model()}; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{results['total_s']:.0f} s" + (f"; {out}" if out else ""))


if __name__ == "__main__":
    main()
