"""A synthetic imagefolder metadata.jsonl of any size, for timing `clipmed prepare` at a million rows.

Row i reuses the image, caption and label of roco-radiology row ``i % 2626`` under a new id (``syn-0000000``...)
and a new group (an article per three rows). Images stay where they are: prepare the file with ``--image-root``
pointing at the roco folder, so nothing is copied and every path stays inside what prepare may read.

    python bench/synthetic_metadata.py --rows 1000000 --out /tmp/syn1m
    /usr/bin/time -v clipmed prepare /tmp/syn1m --image-root ../shared/datasets/roco-radiology \\
        --group-field article --no-image-check --out /tmp/syn1m-prepared

`write_synthetic_metadata(out, rows)` does the same from Python (bench/scale.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROCO = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "roco-radiology"


def write_synthetic_metadata(out: str | Path, rows: int, *, template: Path = ROCO / "metadata.jsonl") -> Path:
    """Write ``out/metadata.jsonl`` with `rows` rows cycled from `template`; returns the file's path.

    Image paths stay relative to the template's folder: prepare it with ``--image-root`` set to that folder.
    """
    base = [json.loads(line) for line in template.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metadata.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(rows):
            row = dict(base[index % len(base)], id=f"syn-{index:07d}", article=f"SYN{index // 3:07d}")
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", required=True, help="folder for metadata.jsonl")
    args = parser.parse_args()
    print(write_synthetic_metadata(args.out, args.rows))


if __name__ == "__main__":
    main()
