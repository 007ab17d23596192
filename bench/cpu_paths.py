"""Wall-clock of three CPU paths that once had timing assertions in unit tests (flaky on a loaded CI machine):
the linear probe (1,000 x 256 features, 10 classes, its C grid cross-validated), concept extraction of 2,000
captions, and `prepare` on roco-radiology (skipped where the dataset is absent).

    python bench/cpu_paths.py --out bench/results/cpu_paths.json

Each is timed `--repeats` times in this process; the table shows the median and the fastest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROCO, machine, print_table, write_results  # noqa: E402


def timed(work: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/cpu_paths.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare
    from clipmed.evaluation.probe import linear_probe
    from clipmed.knowledge import ConceptExtractor, Vocabulary

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1500)
    features = rng.normal(size=(10, 256))[labels] * 0.2 + rng.normal(size=(1500, 256))
    extractor = ConceptExtractor(Vocabulary.default())
    captions = ["Axial contrast-enhanced CT of the abdomen shows a 3 cm hypodense mass in the liver, no ascites, "
                "possible metastasis to the adrenal gland; no pneumothorax."] * 2000
    work = {"linear probe, 1000 x 256, 10 classes": lambda: linear_probe(
                features[:1000], labels[:1000], features[1000:], labels[1000:], [str(i) for i in range(10)]),
            "concept extraction, 2000 captions": lambda: extractor.matrix(captions)}
    if (ROCO / "metadata.jsonl").is_file():
        def prepare_roco() -> None:
            with tempfile.TemporaryDirectory() as out:
                prepare(str(ROCO), out, fields=FieldMap(label_field="body_part", group_field="article"),
                        progress=False)

        work["prepare roco-radiology (2626 rows)"] = prepare_roco
    seconds = {name: timed(step, args.repeats) for name, step in work.items()}
    print_table(["path", "median s", "fastest s"],
                [[name, f"{statistics.median(s):.3f}", f"{min(s):.3f}"] for name, s in seconds.items()])
    write_results(args.out, {"machine": machine(), "seconds": seconds})


if __name__ == "__main__":
    main()
