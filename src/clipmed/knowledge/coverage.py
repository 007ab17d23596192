"""How much of a caption set the vocabulary covers (the ``clipmed entities DATA`` report).

Coverage matters because a caption with no concept has an all-zero entity vector: the semantic-matching loss
can then only treat it as unrelated to everything, so low coverage means the vocabulary needs work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


from clipmed.knowledge.extract import ConceptExtractor


def coverage(texts: Sequence[str | None], extractor: ConceptExtractor | None = None) -> dict[str, Any]:
    """Counts over ``texts``: n, with_concept (texts with at least one concept), share, mean_concepts
    (per text), and per_concept {concept: texts that mention it}, most frequent first."""
    extractor = extractor or ConceptExtractor()
    hits = extractor.matrix(list(texts)) > 0
    counts = hits.sum(axis=0)
    n = len(texts)
    with_concept = int(hits.any(axis=1).sum())
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    return {
        "n": n,
        "with_concept": with_concept,
        "share": with_concept / n if n else 0.0,
        "mean_concepts": float(hits.sum(axis=1).mean()) if n else 0.0,
        "per_concept": {extractor.vocab.concepts[i]: int(counts[i]) for i in order},
    }


def format_coverage(report: dict[str, Any], top: int | None = None) -> str:
    """Plain-text table of a :func:`coverage` report (``top`` limits the concept rows)."""
    n = report["n"]
    lines = [
        f"texts: {n}   with >= 1 concept: {report['with_concept']} ({100 * report['share']:.1f}%)"
        f"   concepts per text: {report.get('mean_concepts', float('nan')):.2f}",
        "",
        f"{'concept':<20} {'texts':>7} {'share':>7}",
        f"{'-' * 20} {'-' * 7} {'-' * 7}",
    ]
    rows = list(report["per_concept"].items())
    for name, count in rows[:top] if top else rows:
        lines.append(f"{name:<20} {count:>7} {100 * count / n if n else 0.0:>6.1f}%")
    return "\n".join(lines)


__all__ = ["coverage", "format_coverage"]
