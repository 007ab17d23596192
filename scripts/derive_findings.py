"""Derive a multilabel `findings` field from a dataset's captions, for benchmark suites (configs/suites/roco.yaml).

Each row's findings are the concepts of clipmed's vocabulary in the `finding` group that its caption mentions
as present (clipmed.knowledge's extraction: negated and uncertain mentions do not count). The output is an
imagefolder dataset (`metadata.jsonl`) whose rows keep the source's fields and add `findings` (a JSON list);
images are never copied: `file_name` stays relative to the source's folder, which the suite names as the
dataset's `image_root`.

With `--prepared DIR` (a folder written by `clipmed prepare` on the same source) it writes the rows of the
held-out splits the models never trained on, one dataset each: OUT/test and OUT/val (val serves
`clipmed benchmark --calibrate`). Without it, every row goes to OUT.

    python scripts/derive_findings.py ../shared/datasets/roco-radiology --prepared runs/roco/prepared \\
        --out runs/roco-suite
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from clipmed.data.records import FieldMap
from clipmed.data.sources import load_source
from clipmed.data.split import read_manifest
from clipmed.io import write_text_atomic
from clipmed.knowledge import ConceptExtractor, Vocabulary


def derive(source: str, out: Path, *, prepared: Path | None = None, caption_field: str = "caption",
           image_field: str = "file_name") -> dict[str, Counter]:
    """Write the derived dataset(s); return the finding counts of each written dataset."""
    loaded = load_source(source, fields=FieldMap(caption_field=caption_field, label_field=None,
                                                 image_field=image_field))
    extractor = ConceptExtractor()
    findings = set(Vocabulary.default().group("finding"))
    image_root = loaded.image_root or (loaded.path if os.path.isdir(loaded.path) else os.path.dirname(loaded.path))
    rows = {}
    for record in loaded.records:
        present = sorted(name for name, weight in extractor.weights(record.caption or "").items()
                         if name in findings and weight == 1.0)
        file_name = os.path.relpath(os.path.realpath(record.image_path), os.path.realpath(image_root))
        rows[record.id] = {**record.extra, "id": record.id, "file_name": file_name, "caption": record.caption,
                           "findings": present}
    if prepared is None:
        parts = {out: list(rows)}
    else:
        splits = read_manifest(prepared)["splits"]
        parts = {out / name: splits[name] for name in ("test", "val")}
    counts = {}
    for folder, ids in parts.items():
        chosen = [rows[i] for i in ids if i in rows]
        write_text_atomic(folder / "metadata.jsonl",
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chosen))
        counts[str(folder)] = Counter(name for row in chosen for name in row["findings"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the source dataset (any layout clipmed reads)")
    parser.add_argument("--out", required=True, help="output folder (outside the repository's tracked files)")
    parser.add_argument("--prepared", type=Path, help="a `clipmed prepare` folder of the same source: write its "
                        "test and val rows only")
    parser.add_argument("--caption-field", default="caption")
    parser.add_argument("--image-field", default="file_name")
    args = parser.parse_args()
    counts = derive(args.data, Path(os.path.abspath(args.out)), prepared=args.prepared,
                    caption_field=args.caption_field, image_field=args.image_field)
    for folder, found in counts.items():
        common = ", ".join(f"{name} {count}" for name, count in found.most_common(12))
        print(f"{folder}/metadata.jsonl: {common}")


if __name__ == "__main__":
    main()
