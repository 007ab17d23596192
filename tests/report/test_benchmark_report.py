"""The benchmark tables: datasets as rows, models as columns, an Average row per task kind, and the best cell
marked only where its interval separates from every other model's; reproduce's report carries the same tables."""

from __future__ import annotations

from clipmed.report.benchmark import benchmark_tables
from clipmed.report.markdown import render_report


def _result(task: str, value: float, half_width: float) -> dict:
    key = "top1" if task == "multiclass" else "macro_auroc"
    return {"task": task, "ensemble": {key: value, "ci95": {key: [value - half_width, value + half_width]}}}


def _benchmark() -> dict:
    results = {"a": {"body": _result("multiclass", 0.80, 0.05), "modality": _result("multiclass", 0.50, 0.05),
                     "findings": _result("multilabel", 0.70, 0.10)},
               "b": {"body": _result("multiclass", 0.60, 0.05), "modality": _result("multiclass", 0.48, 0.05),
                     "findings": _result("multilabel", 0.65, 0.10)}}
    info = {name: {"task": r["task"], "n_rows": 150, "classes": ["x", "y"]} for name, r in results["a"].items()}
    average = {"a": {"multiclass_top1": {"value": 0.65, "ci95": [0.61, 0.69]},
                     "multilabel_auroc": {"value": 0.70, "ci95": [0.6, 0.8]}},
               "b": {"multiclass_top1": {"value": 0.54, "ci95": [0.50, 0.58]},
                     "multilabel_auroc": {"value": 0.65, "ci95": [0.55, 0.75]}}}
    return {"suite": "suite.yaml", "models": ["a", "b"], "datasets": list(results["a"]), "dataset_info": info,
            "results": results, "average": average, "config": {"n_boot": 1000}}


def test_best_cell_marked_only_where_intervals_separate():
    text = "\n".join(benchmark_tables(_benchmark()))
    # body: 80 [75, 85] vs 60 [55, 65] separate -> bold; modality: 50 [45, 55] vs 48 [43, 53] overlap -> plain.
    assert "| body | 150 | 2 | **80.0 [75.0, 85.0]** | 60.0 [55.0, 65.0] |" in text
    assert "| modality | 150 | 2 | 50.0 [45.0, 55.0] | 48.0 [43.0, 53.0] |" in text
    assert "| Average |  |  | **65.0 [61.0, 69.0]** | 54.0 [50.0, 58.0] |" in text
    # The multilabel datasets get their own table and Average row, never mixed with the multiclass ones.
    multilabel = text.split("## Multilabel")[1]
    assert "| findings | 150 | 2 | 70.0 [60.0, 80.0] | 65.0 [55.0, 75.0] |" in multilabel
    assert multilabel.count("| Average |") == 1 and "body" not in multilabel


def test_reproduce_report_adds_the_suite_tables():
    evaluate = {"n": 5, "classes": ["a"], "top1": 0.6, "top3": 1.0, "macro_f1": 0.5, "balanced_accuracy": 0.5,
                "majority_rate": 0.6, "ci95": {"top1": [0.5, 0.7], "top3": [1, 1], "macro_f1": [0.4, 0.6]},
                "per_class": {"a": {"n": 5, "top1": 0.6}}, "confusion": {"classes": ["a"], "matrix": [[5]]}}
    text = render_report({"models": {"base": evaluate}, "benchmark": _benchmark()}, {})
    section = text.split("## Benchmark suite")[1]
    assert "### Multiclass datasets" in section and "| body | 150 | 2 | **80.0 [75.0, 85.0]**" in section
