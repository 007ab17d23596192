"""The markdown report: the paper's Table 1 and per-class results, then each extra evaluation that was run.

Input is plain dicts (evaluate JSON per model plus run context); sections whose data is absent are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipmed.io import write_text_atomic
from clipmed.report.figures import DATA_EFFICIENCY_PNG, EMBEDDINGS_PNG, PER_CLASS_PNG

REPORT_MD = "report.md"
CONTEXT_KEYS = (
    "dataset",  # str: dataset name
    "dataset_path",  # str
    "label_field",  # str: the record field the classes come from
    "label_source",  # str: free text, where the labels come from
    "counts",  # dict[str, int | dict[str, int]]: train, val, test, rejected...; a dict value (per class) gets a line
    "model",  # str: the model spec
    "notes",  # dict[model name, str]: shown under Table 1
    "elapsed_s",  # float: wall time of the run
    "figures",  # list[str]: PNG file names present in out_dir
    "command",  # str: the command line
)


def write_report(out_dir: str | os.PathLike, metrics: dict, context: dict) -> Path:
    """Write `out_dir/report.md` (see `render_report`) atomically and return its path."""
    path = Path(out_dir) / REPORT_MD
    write_text_atomic(path, render_report(metrics, context))
    return path


def render_report(metrics: dict, context: dict) -> str:
    """The report as markdown text; report.html renders this same text, so the two never disagree.

    `metrics` is `{"models": {name: evaluate_json}}` (evaluate JSON = `classification_metrics`, optionally
    with `ensemble`, `probe`, `retrieval`); all models must be scored on the same test classes and rows.
    `context` may hold any of `CONTEXT_KEYS`; unknown keys are an error so nothing is silently dropped.
    """
    unknown = sorted(set(context) - set(CONTEXT_KEYS))
    if unknown:
        raise ValueError(f"unknown report context keys {unknown}; expected some of {list(CONTEXT_KEYS)}")
    models = metrics["models"]
    if not models:
        raise ValueError("no models in metrics; nothing to report")
    first = next(iter(models.values()))
    if any(m["classes"] != first["classes"] or m["n"] != first["n"] for m in models.values()):
        raise ValueError("models were evaluated on different test sets; Table 1 would compare unlike numbers")

    figures = list(context.get("figures", []))
    lines = ["# clipmed report", ""]
    lines += _data_section(context)
    lines += _table1(models, context.get("notes", {}))
    lines += _other_label_fields(models, metrics.get("other_label_fields", {}), context.get("label_field"))
    lines += _training(metrics.get("training", {}))
    lines += _per_class(models, PER_CLASS_PNG in figures)
    lines += _ensemble(models)
    lines += _probe(models)
    lines += _retrieval(models)
    lines += _semantic_temperature(metrics.get("semantic_temperature", {}))
    lines += _benchmark(metrics.get("benchmark"))
    lines += _figure_section("Image embeddings (t-SNE)", EMBEDDINGS_PNG, figures)
    lines += _figure_section("Data efficiency", DATA_EFFICIENCY_PNG, figures)
    others = [f for f in figures if f not in (PER_CLASS_PNG, EMBEDDINGS_PNG, DATA_EFFICIENCY_PNG)]
    if others:
        lines += ["## Other figures", ""] + [f"![{name}]({name})" for name in others] + [""]
    lines += _run_section(context)
    return "\n".join(lines).rstrip() + "\n"


def _data_section(context: dict) -> list[str]:
    items = []
    if "dataset" in context or "dataset_path" in context:
        parts = [context.get("dataset"), f"(`{context['dataset_path']}`)" if "dataset_path" in context else None]
        items.append("- Dataset: " + " ".join(part for part in parts if part))
    if "label_field" in context:
        items.append(f"- Label field: `{context['label_field']}`")
    if "label_source" in context:
        items.append(f"- Labels come from: {context['label_source']}")
    if "counts" in context:
        items += _counts(context["counts"])
    if "model" in context:
        items.append(f"- Model: `{context['model']}`")
    return ["## Data", ""] + items + [""] if items else []


def _counts(counts: dict) -> list[str]:
    """A "Rows: train 1,000, ..." line for plain counts, then one line per nested count table (e.g. per class)."""
    flat = {key: value for key, value in counts.items() if not isinstance(value, dict)}
    lines = [f"- Rows: {_count_list(flat)}"] if flat else []
    nested = {key: value for key, value in counts.items() if isinstance(value, dict) and value}
    return lines + [f"- {key.replace('_', ' ')}: {_count_list(value)}" for key, value in nested.items()]


def _count_list(counts: dict) -> str:
    return ", ".join(f"{format_cell(str(key).replace('_', ' '))} {value:,}" for key, value in counts.items())


def _table1(models: dict, notes: dict) -> list[str]:
    first = next(iter(models.values()))
    counts = [cell["n"] for cell in first["per_class"].values()]
    majority = first["classes"][counts.index(max(counts))]
    rows = [
        [
            format_cell(name),
            format_pct_ci(m["top1"], m["ci95"]["top1"]),
            format_pct_ci(m["top3"], m["ci95"]["top3"]),
            format_pct_ci(m["macro_f1"], m["ci95"]["macro_f1"]),
            format_pct(m["balanced_accuracy"]),
        ]
        for name, m in models.items()
    ]
    lines = [
        "## Zero-shot classification (Table 1)",
        "",
        f"Test split: {first['n']:,} images, {len(first['classes'])} classes. The majority class "
        f"({format_cell(majority)}) is {format_pct(first['majority_rate'])}% of the test rows: always guessing it "
        f"scores {format_pct(first['majority_rate'])}% top-1 "
        f"(uniform chance: {format_pct(1 / len(first['classes']))}%). "
        "Intervals are 95% bootstrap intervals over test rows."
        + (f" Prompt template: `{first['template']}`." if "template" in first else ""),
        "",
    ]
    lines += markdown_table(["Model", "Top-1 % [95% CI]", "Top-3 % [95% CI]", "Macro-F1 % [95% CI]",
                             "Balanced acc. %"], rows)
    lines += [f"- **{format_cell(name)}**: {note}" for name, note in notes.items()]
    return lines + ([""] if notes else [])


def _other_label_fields(models: dict, other: dict, label_field: str | None) -> list[str]:
    """Zero-shot top-1 of every model on the other label fields of the test rows (what fine-tuning forgets)."""
    fields = sorted({field for results in other.values() for field in results})
    if not fields:
        return []
    sizes = {field: next(r[field] for r in other.values() if field in r) for field in fields}
    header = ["Model", f"{format_cell(label_field or 'label')} top-1 % [95% CI]"] + [
        f"{format_cell(field)} top-1 % [95% CI] (n={sizes[field]['n']}, {len(sizes[field]['classes'])} classes, "
        f"majority {format_pct(sizes[field]['majority_rate'])}%)" for field in fields]
    rows = [[format_cell(name), format_pct_ci(m["top1"], m["ci95"]["top1"])]
            + [format_pct_ci(other[name][f]["top1"], other[name][f]["ci95"]["top1"]) if f in other.get(name, {})
               else "—" for f in fields] for name, m in models.items()]
    note = ("The same models scored zero-shot on other label fields of the test rows (the rows that have one): a "
            "fine-tuned model that falls towards the majority rate there has forgotten what it was not trained on.")
    return ["## Other label fields (forgetting)", "", note, ""] + markdown_table(header, rows)


def _training(runs: dict) -> list[str]:
    """Trainable parameters and training time of every fine-tuned model (WiSE-FT: its chosen mixing weight)."""
    if not runs:
        return []
    rows = [[format_cell(name), "—" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}",
             "—" if r["seconds"] is None else _duration(r["seconds"]),
             "" if r.get("wise_ft_alpha") is None else f"a = {r['wise_ft_alpha']:g}"] for name, r in runs.items()]
    return ["## Training", ""] + markdown_table(["Model", "Trainable parameters", "Training time", "WiSE-FT"], rows)


def _per_class(models: dict, with_figure: bool) -> list[str]:
    first = next(iter(models.values()))
    lines = ["### Per class", ""]
    if with_figure:
        lines += [f"![Per-class top-1 accuracy]({PER_CLASS_PNG})", ""]
    rows = [
        [format_cell(c), f"{first['per_class'][c]['n']:,}"]
        + [format_pct(m["per_class"][c]["top1"]) for m in models.values()]
        for c in first["classes"]
    ]
    return lines + markdown_table(["Class", "Test n"] + [f"{format_cell(name)} top-1 %" for name in models], rows)


def _ensemble(models: dict) -> list[str]:
    rows = [
        [
            format_cell(name),
            format_pct(m["top1"]),
            format_pct_ci(m["ensemble"]["top1"], m["ensemble"]["ci95"]["top1"]),
            f"{100 * (m['ensemble']['top1'] - m['top1']):+.1f}",
            format_pct(m["macro_f1"]),
            format_pct(m["ensemble"]["macro_f1"]),
        ]
        for name, m in models.items()
        if "ensemble" in m
    ]
    if not rows:
        return []
    header = ["Model", "Single top-1 %", "Ensemble top-1 % [95% CI]", "Δ top-1 (pts)", "Single macro-F1 %",
              "Ensemble macro-F1 %"]
    return ["## Prompt ensemble vs single template", ""] + markdown_table(header, rows)


def _semantic_temperature(runs: dict) -> list[str]:
    """How tau_t, the temperature of the semantic targets softmax(s / tau_t), changes the semantic model."""
    if not runs:
        return []
    rows = [[format_cell(tau), format_pct_ci(m["top1"], m["ci95"]["top1"]), format_pct_ci(m["top3"], m["ci95"]["top3"]),
             format_pct_ci(m["macro_f1"], m["ci95"]["macro_f1"])] for tau, m in runs.items()]
    note = ("Same data, schedule and seed; only tau_t changes. A small tau_t makes the targets nearly one-hot on the "
            "texts that share the most concepts; tau_t = 1 is MedCLIP's own code (raw cosine, no temperature), whose "
            "targets stay close to uniform over the batch.")
    return (["## Semantic target temperature", "", note, ""]
            + markdown_table(["tau_t", "Top-1 % [95% CI]", "Top-3 % [95% CI]", "Macro-F1 % [95% CI]"], rows))


def _probe(models: dict) -> list[str]:
    probes = {name: m["probe"] for name, m in models.items() if "probe" in m}
    if not probes:
        return []
    shots = sorted({k for p in probes.values() for k in p["k_shot"]}, key=int)
    rows, skipped = [], []
    for name, p in probes.items():
        full = p["full"]
        row = [format_cell(name), f"{full['n_train']:,}", format_pct_ci(full["top1"], full["ci95"]["top1"]),
               format_pct_ci(full["macro_f1"], full["ci95"]["macro_f1"])]
        for k in shots:
            cell = p["k_shot"].get(k)
            if cell is None:
                row.append("—")
            elif "skipped" in cell:
                row.append("skipped")
                skipped.append(f"- {format_cell(name)}, {k}-shot skipped: {cell['skipped']}")
            else:
                row.append(f"{format_pct(cell['top1_mean'])} ± {format_pct(cell['top1_std'])}")
        rows.append(row)
    header = ["Model", "Train n", "Full top-1 % [95% CI]", "Full macro-F1 % [95% CI]"]
    header += [f"{k}-shot top-1 %" for k in shots]
    draws = sorted({c["draws"] for p in probes.values() for c in p["k_shot"].values() if "draws" in c})
    intro = "Logistic regression on frozen image embeddings, C chosen on the train split only."
    if draws:
        intro += f" k-shot: k train images per class, mean ± std over {', '.join(map(str, draws))} random draws."
    return ["## Linear probe", "", intro, ""] + markdown_table(header, rows) + skipped + ([""] if skipped else [])


def _retrieval(models: dict) -> list[str]:
    results = {name: m["retrieval"] for name, m in models.items() if "retrieval" in m}
    if not results:
        return []
    lines = ["## Retrieval", ""]
    lines += [f"- {format_cell(name)}: mean R@1 over both directions {format_pct(r['mean_recall_at_1'])}%"
              for name, r in results.items()]
    lines.append("")
    ks = sorted({k for r in results.values() for k in r["ks"]})
    for key, title in (("image_to_text", "Image → text"), ("text_to_image", "Text → image")):
        with_precision = any("precision_at" in r[key] for r in results.values())
        header = ["Model", "Queries"] + [f"R@{k} %" for k in ks] + ([f"P@{k} %" for k in ks] if with_precision else [])
        rows = []
        for name, r in results.items():
            d = r[key]
            row = [format_cell(name), f"{d['n_queries']:,}"] + [_at(d, "recall", k) for k in ks]
            rows.append(row + ([_at(d, "precision", k) for k in ks] if with_precision else []))
        lines += [f"### {title}", ""] + markdown_table(header, rows)
    note = "R@K: the paired item is in the top K. P@K: share of the top K with the query's label. "
    return lines + [note + "Brackets: 95% bootstrap intervals over queries.", ""]


def _at(direction: dict, kind: str, k: int) -> str:
    """One R@K / P@K cell, with its interval when the metrics carry one."""
    value = direction.get(f"{kind}_at", {}).get(str(k))
    ci = direction.get("ci95", {}).get(f"{kind}@{k}")
    return format_pct(value) if ci is None else format_pct_ci(value, ci)


def _benchmark(benchmark: dict | None) -> list[str]:
    """The benchmark suite's headline tables (`clipmed reproduce --suite`); every metric is in benchmark/."""
    if benchmark is None:
        return []
    from clipmed.report.benchmark import benchmark_tables  # it renders with this module's table helpers

    tables = [f"#{line}" if line.startswith("## ") else line for line in benchmark_tables(benchmark)]
    return (["## Benchmark suite", "",
             f"Every model zero-shot on each dataset of `{benchmark['suite']}` (prompt ensembles, 95% bootstrap "
             "intervals; bold: an interval above every other model's). All metrics, calibration and ranks: "
             "`benchmark/benchmark.md`.", ""] + tables)


def _figure_section(title: str, name: str, figures: list[str]) -> list[str]:
    return [f"## {title}", "", f"![{title}]({name})", ""] if name in figures else []


def _run_section(context: dict) -> list[str]:
    items = []
    if "command" in context:
        items.append(f"- Command: `{context['command']}`")
    if "elapsed_s" in context:
        items.append(f"- Elapsed: {_duration(context['elapsed_s'])}")
    return ["## Run", ""] + items + [""] if items else []


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def format_pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def format_pct_ci(value: float | None, ci: list[float] | None) -> str:
    return format_pct(value) if ci is None else f"{format_pct(value)} [{format_pct(ci[0])}, {format_pct(ci[1])}]"


def format_cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
