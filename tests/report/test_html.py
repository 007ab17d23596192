"""report.html: the markdown report's content as one self-contained page, plus the retrieval gallery."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from clipmed.data.sources import load_source
from clipmed.evaluation.metrics import classification_metrics, retrieval_metrics
from clipmed.report.figures import embedding_figure, per_class_figure
from clipmed.report.gallery import build_gallery
from clipmed.report.html import write_html_report
from clipmed.report.markdown import render_report, write_report


def sample_report(out_dir: Path, dataset: Path) -> tuple[dict, dict, dict]:
    """Metrics, context and gallery as the pipeline makes them, from embeddings that cluster by class.

    Every optional section is present; the figures are real PNGs in out_dir.
    """
    records = [r for r in load_source(str(dataset)).records if r.label][:36]
    classes = sorted({r.label for r in records})
    labels = np.array([classes.index(r.label) for r in records])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(classes), 16))
    models, embeddings = {}, {}
    for name, noise in (("base", 3.0), ("caption", 1.0), ("label", 0.6)):
        images = centres[labels] + noise * rng.normal(size=(len(records), 16))
        scores = images @ centres.T / np.linalg.norm(images, axis=1, keepdims=True) / np.linalg.norm(centres, axis=1)
        models[name] = classification_metrics(scores, labels, classes, n_boot=50)
        embeddings[name] = images
    texts = embeddings["label"] + 0.8 * rng.normal(size=embeddings["label"].shape)
    models["label"]["ensemble"] = classification_metrics(scores + 0.05, labels, classes, n_boot=50)
    models["label"]["retrieval"] = retrieval_metrics(embeddings["label"], texts, image_labels=labels,
                                                     text_labels=labels, n_boot=50)
    models["label"]["probe"] = {
        "full": {"top1": 0.9, "macro_f1": 0.88, "ci95": {"top1": [0.8, 0.95], "macro_f1": [0.78, 0.93]},
                 "n_train": 1200, "C": 0.1},
        "k_shot": {"1": {"top1_mean": 0.352, "top1_std": 0.062, "macro_f1_mean": 0.3, "macro_f1_std": 0.05,
                         "draws": 5}},
    }
    per_class_figure(models, out_dir / "per_class.png")
    embedding_figure(embeddings, labels, classes, out_dir / "embeddings.png")
    context = {"dataset": "synthetic", "dataset_path": str(dataset), "label_field": "body_part",
               "label_source": "the `body_part` field", "counts": {"train": 24, "test": len(records)},
               "model": "dual:default", "notes": {"base": "untrained projection: chance level"},
               "figures": ["per_class.png", "embeddings.png"], "elapsed_s": 75.0, "command": "clipmed reproduce"}
    gallery = build_gallery(embeddings["label"], texts, records, scores, classes, logit_scale=30.0, model="label")
    return {"models": models}, context, gallery


def _evaluate(classes: list[str]) -> dict:
    """A hand-written evaluate JSON on 5 test rows (3 of the first class, 2 of the second)."""
    return {"n": 5, "classes": classes, "top1": 0.6, "top3": 1.0, "macro_f1": 0.55, "balanced_accuracy": 0.5,
            "majority_rate": 0.6, "ci95": {"top1": [0.5, 0.7], "top3": [0.9, 1.0], "macro_f1": [0.45, 0.65]},
            "per_class": {classes[0]: {"n": 3, "top1": 1 / 3}, classes[1]: {"n": 2, "top1": 1.0}}}


def _img_sources(html: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", html)


def test_tables_figures_and_gallery_in_one_self_contained_page(tmp_path, synthetic_dataset):
    metrics, context, gallery = sample_report(tmp_path, synthetic_dataset)
    path = write_html_report(tmp_path, metrics, context, gallery)
    assert path == tmp_path / "report.html"
    html = path.read_text()

    base = metrics["models"]["base"]
    lo, hi = (100 * v for v in base["ci95"]["top1"])
    # An interval wraps as a whole, after its estimate, never inside.
    assert (f'<td>base</td><td>{100 * base["top1"]:.1f} <span class="nowrap">[{lo:.1f}, {hi:.1f}]</span></td>'
            in html)
    for heading in ("Zero-shot classification (Table 1)", "Per class", "Prompt ensemble vs single template",
                    "Linear probe", "Retrieval", "Image embeddings (t-SNE)", "Retrieval gallery"):
        assert heading in html
    assert "<li><strong>base</strong>: untrained projection: chance level</li>" in html
    assert "<code>body_part</code>" in html and "`" not in html  # inline code became <code>
    # Everything inline: per-class and embedding figures plus one thumbnail per shown image.
    sources = _img_sources(html)
    assert sum(s.startswith("data:image/png;base64,") for s in sources) == 2
    assert all(s.startswith("data:image/") for s in sources)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "default-src 'none'" in html


def test_gallery_marks_the_right_images_and_credits_every_thumbnail(tmp_path, synthetic_dataset):
    metrics, context, gallery = sample_report(tmp_path, synthetic_dataset)
    html = write_html_report(tmp_path, metrics, context, gallery).read_text()
    shown = [item for q in gallery["text_to_image"] for item in q["results"]] + gallery["image_to_label"]
    assert html.count('<figure class="card') == len(shown) > 0
    assert html.count('<div class="attribution">fig') == len(shown)  # synthetic sources are "fig<N>"
    assert html.count("CC BY</div>") == len(shown)
    assert html.count("✓ its image") == sum(item["correct"] for q in gallery["text_to_image"] for item in q["results"])
    first = gallery["image_to_label"][0]
    assert f"true: <strong>{first['label']}</strong>" in html
    assert f"{100 * first['predictions'][0]['probability']:.1f}%" in html


def test_names_are_escaped_and_markdown_escapes_undone(tmp_path):
    models = {"base": _evaluate(["<i>a</i>", "b|c"])}
    html = write_html_report(tmp_path, {"models": models}, {"label_source": "field `x<y`"}).read_text()
    assert "<td>&lt;i&gt;a&lt;/i&gt;</td><td>3</td>" in html
    assert "<td>b|c</td><td>2</td>" in html  # markdown's \| is a literal pipe, and the cell stays one cell
    assert "<code>x&lt;y</code>" in html
    assert "<i>" not in html


def test_without_a_gallery_or_figures(tmp_path):
    html = write_html_report(tmp_path, {"models": {"base": _evaluate(["a", "b"])}}, {}).read_text()
    assert "Retrieval gallery" not in html and "<img" not in html
    assert "Zero-shot classification (Table 1)" in html


def test_a_listed_figure_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="per_class.png"):
        write_html_report(tmp_path, {"models": {"base": _evaluate(["a", "b"])}}, {"figures": ["per_class.png"]})
    assert not (tmp_path / "report.html").exists()


def test_markdown_report_is_the_rendered_text(tmp_path):
    metrics, context = {"models": {"base": _evaluate(["a", "b"])}}, {"command": "clipmed reproduce"}
    assert write_report(tmp_path, metrics, context).read_text() == render_report(metrics, context)
