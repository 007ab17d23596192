"""benchmark.md and benchmark.html from the benchmark JSON (`clipmed.evaluation.benchmark.run_benchmark`).

Datasets are rows and models columns; each table ends with an `Average` row over its datasets (multiclass and
multilabel datasets in separate tables, never mixed). A cell is bold only where its interval lies wholly above
every other model's interval in that row: a best value whose interval overlaps another's is not marked.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipmed.evaluation.calibration import TEMPERATURE_RANGE
from clipmed.io import write_text_atomic
from clipmed.report.figures import reliability_figure
from clipmed.report.html import write_markdown_page
from clipmed.report.markdown import format_cell, format_pct, format_pct_ci, markdown_table

BENCHMARK_MD = "benchmark.md"
BENCHMARK_HTML = "benchmark.html"
RELIABILITY_PNG = "reliability.png"
_KIND = {"multiclass": ("top1", "multiclass_top1", "zero-shot top-1 %, prompt ensemble"),
         "multilabel": ("macro_auroc", "multilabel_auroc", "macro AUROC %, prompt ensemble")}


def write_benchmark_report(out_dir: str | os.PathLike, benchmark: dict) -> list[Path]:
    """Write benchmark.md, reliability.png and benchmark.html into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    figure = out_dir / RELIABILITY_PNG
    reliability_figure({(dataset, model): benchmark["results"][model][dataset]["calibration"]
                        for dataset in benchmark["datasets"] for model in benchmark["models"]}, figure)
    text = render_benchmark(benchmark, figure=RELIABILITY_PNG)
    markdown = out_dir / BENCHMARK_MD
    write_text_atomic(markdown, text)
    html = write_markdown_page(out_dir / BENCHMARK_HTML, text, out_dir, title="clipmed benchmark")
    return [markdown, figure, html]


def render_benchmark(benchmark: dict, *, figure: str | None = None) -> str:
    """The benchmark report as markdown (benchmark.html renders this same text)."""
    models = benchmark["models"]
    config = benchmark["config"]
    lines = ["# clipmed benchmark", "",
             f"Suite `{benchmark['suite']}`: {_count(len(benchmark['datasets']), 'dataset')}, "
             f"{_count(len(models), 'model')}. 95% "
             f"bootstrap intervals ({config['n_boot']} resamples over each dataset's rows). Bold: the best cell of "
             "its row whose interval lies above every other model's.", ""]
    lines += benchmark_tables(benchmark)
    lines += ["## Rank per dataset", ""]
    lines += markdown_table(["Dataset", *map(format_cell, models)],
                    [[format_cell(d), *(str(benchmark["rank"][d][m] or "—") for m in models)]
                     for d in benchmark["datasets"]])
    lines += _details(benchmark)
    lines += _calibration(benchmark, figure)
    lines += _skipped(benchmark)
    return "\n".join(lines).rstrip() + "\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def benchmark_tables(benchmark: dict) -> list[str]:
    """The headline tables, one per task kind present, each with its Average row (also in reproduce's report)."""
    models = benchmark["models"]
    info = benchmark["dataset_info"]
    lines = []
    for task, (key, average_key, title) in _KIND.items():
        names = [d for d in benchmark["datasets"] if info[d]["task"] == task]
        if not names:
            continue
        rows = []
        for dataset in names:
            cells = [_headline(benchmark["results"][m][dataset]["ensemble"], key) for m in models]
            rows.append([format_cell(dataset), str(info[dataset]["n_rows"]), str(len(info[dataset]["classes"])),
                         *_mark(cells)])
        averages = [benchmark["average"][m][average_key] for m in models]
        rows.append(["Average", "", "", *_mark([(a["value"], a["ci95"]) if a else (None, None) for a in averages])])
        lines += [f"## {task.capitalize()} datasets: {title}", ""]
        kind = "classes" if task == "multiclass" else "findings"
        lines += markdown_table(["Dataset", "n", kind, *map(format_cell, models)], rows)
    return lines


def _headline(result: dict, key: str) -> tuple[float | None, list[float] | None]:
    return result[key], result["ci95"][key]


def _mark(cells: list[tuple[float | None, list[float] | None]]) -> list[str]:
    """Cells as `61.2 [59.0, 63.4]`, the best in bold where its lower bound is above every other upper bound."""
    text = [format_pct_ci(value, ci) for value, ci in cells]
    scored = [i for i, (value, ci) in enumerate(cells) if value is not None and ci is not None]
    if len(scored) > 1:
        best = max(scored, key=lambda i: cells[i][0])
        if all(cells[best][1][0] > cells[i][1][1] for i in scored if i != best):
            text[best] = f"**{text[best]}**"
    return text


def _details(benchmark: dict) -> list[str]:
    lines = ["## Every metric", ""]
    for dataset in benchmark["datasets"]:
        info = benchmark["dataset_info"][dataset]
        results = {m: benchmark["results"][m][dataset] for m in benchmark["models"]}
        lines += [f"### {dataset} ({info['task']}, `{info['label_field']}`)", ""]
        if info["task"] == "multiclass":
            probe = any("probe" in r for r in results.values())
            header = ["Model", "Top-1 % (1 prompt)", "Top-1 % (ensemble)", "Top-3 %", "Macro-F1 %", "Balanced acc. %"]
            rows = []
            for model, r in results.items():
                e = r["ensemble"]
                row = [format_cell(model), format_pct_ci(r["top1"], r["ci95"]["top1"]),
                       format_pct_ci(e["top1"], e["ci95"]["top1"]),
                       format_pct_ci(e["top3"], e["ci95"]["top3"]), format_pct_ci(e["macro_f1"], e["ci95"]["macro_f1"]),
                       format_pct_ci(e["balanced_accuracy"], e["ci95"]["balanced_accuracy"])]
                if probe:
                    full = r.get("probe", {}).get("full")
                    row.append(format_pct_ci(full["top1"], full["ci95"]["top1"]) if full else "—")
                rows.append(row)
            lines += markdown_table(header + (["Linear probe top-1 %"] if probe else []), rows)
            lines.append("Top-3 and the others are the prompt ensemble's. Majority class: "
                         f"{format_pct(next(iter(results.values()))['majority_rate'])}% of the rows.")
            lines.append("")
        else:
            rows = [[format_cell(m), format_pct_ci(r["macro_auroc"], r["ci95"]["macro_auroc"]),
                     format_pct_ci(r["ensemble"]["macro_auroc"], r["ensemble"]["ci95"]["macro_auroc"]),
                     format_pct_ci(r["ensemble"]["map"], r["ensemble"]["ci95"]["map"]),
                     str(r["ensemble"]["redrawn_resamples"])] for m, r in results.items()]
            lines += markdown_table(["Model", "Macro AUROC % (1 prompt pair)", "Macro AUROC % (ensemble)",
                                     "mAP % (ensemble)", "redrawn resamples"], rows)
            first = next(iter(results.values()))["ensemble"]
            finding_rows = []
            for name in first["findings"]:
                cells = []
                for r in results.values():
                    entry = r["ensemble"]["per_class"][name]
                    defined = entry["auroc"] is not None
                    cells.append((entry["auroc"], entry["ci95"]["auroc"]) if defined else (None, None))
                text = _mark(cells)
                if first["per_class"][name]["auroc"] is None:
                    text = [f"undefined ({first['per_class'][name]['undefined']})"] * len(text)
                finding_rows.append([format_cell(name), str(first["per_class"][name]["n_positive"]), *text])
            lines += markdown_table(["Finding (ensemble AUROC %)", "positives", *map(format_cell, results)],
                                    finding_rows)
            lines.append("A resample in which a finding has no positive (or no negative) row is redrawn; undefined "
                         "findings (no positive or no negative row at all) are left out of the macro means.")
            lines.append("")
    return lines


def _calibration(benchmark: dict, figure: str | None) -> list[str]:
    models = benchmark["models"]
    rows = []
    for dataset in benchmark["datasets"]:
        cells = []
        for model in models:
            c = benchmark["results"][model][dataset]["calibration"]
            cell = format_pct(c["ece"])
            if c.get("temperature"):
                bound = c["temperature"] >= TEMPERATURE_RANGE[1] * 0.999  # the fit flattened the scores
                note = ", the bound" if bound else ""
                cell += f" → {format_pct(c['ece_calibrated'])} (T = {c['temperature']:.2f}{note})"
            cells.append(cell)
        rows.append([format_cell(dataset), *cells])
    lines = ["## Calibration", "",
             "Expected calibration error % of the prompt ensemble's zero-shot probabilities (15 equal-width "
             "confidence bins; multilabel: every finding of every row as a two-way positive/negative choice). "
             "With `--calibrate`: after the arrow, the ECE with a temperature fitted on the dataset's val split; "
             f"T at the bound ({TEMPERATURE_RANGE[1]:g}) means the val split found the scores uninformative and the "
             "fit flattened them to near-uniform probabilities.", ""]
    lines += markdown_table(["Dataset", *map(format_cell, models)], rows)
    if figure:
        lines += [f"![reliability diagrams]({figure})", ""]
    return lines


def _skipped(benchmark: dict) -> list[str]:
    items = []
    for dataset in benchmark["datasets"]:
        info = benchmark["dataset_info"][dataset]
        parts = [f"{count} {reason}" for reason, count in sorted(info["rejected_rows"].items())]
        if info["unlabeled_rows"]:
            parts.append(f"{info['unlabeled_rows']} without a class label")
        for model in benchmark["models"]:
            unreadable = benchmark["results"][model][dataset].get("unreadable_images")
            if unreadable:
                parts.append(f"{len(unreadable)} unreadable images ({format_cell(model)})")
        if parts:
            items.append(f"- {format_cell(dataset)}: " + ", ".join(parts))
    return ["## Rows left out", ""] + items + [""] if items else []
