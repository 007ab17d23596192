"""report.html: the markdown report rendered as one self-contained page, plus the retrieval gallery.

The page is the text of `markdown.render_report` (so both reports always say the same), converted from the
small markdown subset that module writes (headings, paragraphs, bullet lists, pipe tables, standalone images;
inline code, bold and backslash escapes). Every image is inlined as a base64 data URI and the page carries no
script, no external stylesheet or font, and a Content-Security-Policy that blocks any fetch: it opens the same
from a mail attachment, a USB stick or an air-gapped machine.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
from collections.abc import Callable
from html import escape
from pathlib import Path

from clipmed.io import write_text_atomic
from clipmed.report.markdown import render_report

REPORT_HTML = "report.html"

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125; margin: 0 auto;
       max-width: 1120px; padding: 1.5rem 2rem 3rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #2f6fb0; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0 1.2rem; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; }
th { background: #eef2f6; text-align: left; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8fafc; }
.nowrap { white-space: nowrap; }
code { background: #eef2f6; padding: 0 .25rem; border-radius: 3px; font-size: .9em; overflow-wrap: anywhere; }
img.figure { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; }
.query { margin: 1rem 0 1.6rem; }
.query-text { margin: .2rem 0 .5rem; }
.cards { display: flex; flex-wrap: wrap; gap: .7rem; align-items: flex-start; }
.card { width: 148px; margin: 0; padding: 6px; border: 3px solid #d0d7de; border-radius: 6px; font-size: .78rem; }
.card.same-label { border-color: #9cc3e6; }
.card.correct { border-color: #2e8b57; background: #eefaf2; }
.card img { display: block; margin: 0 auto 4px; max-width: 128px; max-height: 128px; }
.card .missing { height: 96px; display: flex; align-items: center; justify-content: center; background: #eee; }
.card.wide { width: 220px; }
.card table { margin: .3rem 0; font-size: .78rem; width: 100%; }
.attribution { color: #57606a; font-size: .7rem; overflow-wrap: anywhere; }
.tag { font-weight: 600; color: #2e8b57; }
.legend { color: #57606a; font-size: .85rem; }
"""


def write_html_report(out_dir: str | os.PathLike, metrics: dict, context: dict, gallery: dict | None = None) -> Path:
    """Write `out_dir/report.html` atomically and return its path.

    `metrics` and `context` are those of `markdown.write_report`; the figures named in `context["figures"]`
    must exist in `out_dir`. `gallery` is `gallery.build_gallery`'s dict (None: no gallery section).
    """
    out_dir = Path(out_dir)
    body = _markdown_to_html(render_report(metrics, context), out_dir)
    if gallery is not None:
        body += _gallery_section(gallery)
    path = out_dir / REPORT_HTML
    write_text_atomic(path, _page(body, "clipmed report"))
    return path


def write_markdown_page(path: str | os.PathLike, markdown: str, out_dir: str | os.PathLike, *, title: str) -> Path:
    """Write `markdown` (the subset the reports use; images relative to `out_dir`) as one self-contained page in
    the report's style, atomically; return its path."""
    path = Path(path)
    write_text_atomic(path, _page(_markdown_to_html(markdown, Path(out_dir)), title))
    return path


def _page(body: str, title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


# --- markdown subset -> HTML ---------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6}) (.*)$")
_IMAGE = re.compile(r"^!\[(.*)\]\(([^()]+)\)$")
_CODE = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation (CommonMark)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
_INTERVAL = re.compile(r"\[[^\]<]*\]")  # "[lo, hi]" in a cell: wraps as a whole, never inside


def _markdown_to_html(text: str, out_dir: Path) -> str:
    """Block by block: consecutive lines of one kind form one block; a blank line ends paragraphs and lists."""
    html, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := _HEADING.match(line):
            level = len(heading.group(1))
            html.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif image := _IMAGE.match(line):
            html.append(f'<img class="figure" alt="{escape(image.group(1))}" '
                        f'src="{_data_uri(out_dir / image.group(2))}">')
            i += 1
        elif line.startswith("|"):
            block, i = _take(lines, i, lambda ln: ln.startswith("|"))
            html.append(_html_table(block))
        elif line.startswith("- "):
            block, i = _take(lines, i, lambda ln: ln.startswith("- "))
            html.append("<ul>\n" + "".join(f"<li>{_inline(item[2:])}</li>\n" for item in block) + "</ul>")
        else:
            block, i = _take(lines, i, lambda ln: bool(ln.strip()) and not _starts_block(ln))
            html.append(f"<p>{_inline(' '.join(block))}</p>")
    return "\n".join(html) + "\n"


def _starts_block(line: str) -> bool:
    return bool(_HEADING.match(line) or _IMAGE.match(line)) or line.startswith(("|", "- "))


def _take(lines: list[str], start: int, belongs: Callable[[str], bool]) -> tuple[list[str], int]:
    """The block that starts at `start` and goes on while `belongs(line)`, and the index after it."""
    end = start + 1
    while end < len(lines) and belongs(lines[end]):
        end += 1
    return lines[start:end], end


def _html_table(rows: list[str]) -> str:
    if len(rows) > 1 and _TABLE_RULE.match(rows[1]):
        rows = rows[:1] + rows[2:]
    header, *body = [[cell.strip() for cell in _CELL_SPLIT.split(row.strip())[1:-1]] for row in rows]
    head = "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>"
    rows_html = "".join("<tr>" + "".join(f"<td>{_INTERVAL.sub(_nowrap, _inline(c))}</td>" for c in row) + "</tr>\n"
                        for row in body)
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{rows_html}</tbody>\n</table>"


def _nowrap(match: re.Match) -> str:
    return f'<span class="nowrap">{match.group(0)}</span>'


def _inline(text: str) -> str:
    """Escape, then code spans (taken verbatim), bold and backslash escapes in the text around them."""
    parts, last = [], 0
    for match in _CODE.finditer(text):
        parts.append(_plain(text[last:match.start()]))
        parts.append(f"<code>{escape(match.group(2).strip())}</code>")
        last = match.end()
    parts.append(_plain(text[last:]))
    return "".join(parts)


def _plain(text: str) -> str:
    return _ESCAPED.sub(r"\1", _BOLD.sub(r"<strong>\1</strong>", escape(text)))


def _data_uri(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"the report shows {path.name}, but {path} does not exist: write the figure first "
                         "or leave it out of context['figures']")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# --- the retrieval gallery -------------------------------------------------------------------------------

def _gallery_section(gallery: dict) -> str:
    model = f" of <code>{escape(gallery['model'])}</code>" if gallery.get("model") else ""
    legend = (f"What the model{model} retrieves for a few random test queries. Green: the correct answer (the "
              "caption's own image; the true class); blue: an image of the caption's class. Under every image: its "
              "source and licence.")
    html = ["<h2>Retrieval gallery</h2>", f'<p class="legend">{legend}</p>']
    if gallery["text_to_image"]:
        html.append(f"<h3>Text → image (top {gallery['k']})</h3>")
        html += [_text_query(query) for query in gallery["text_to_image"]]
    if gallery["image_to_label"]:
        html.append("<h3>Image → label (zero-shot, top 3)</h3>")
        html.append('<div class="cards">' + "".join(_image_query(q) for q in gallery["image_to_label"]) + "</div>")
    return "\n".join(html) + "\n"


def _text_query(query: dict) -> str:
    label = f" <span class=\"legend\">(class: {escape(query['label'])})</span>" if query.get("label") else ""
    cards = []
    for rank, item in enumerate(query["results"], start=1):
        kind = " correct" if item["correct"] else " same-label" if item["same_label"] else ""
        mark = '<br><span class="tag">✓ its image</span>' if item["correct"] else ""
        cards.append(_card(item, kind, f"#{rank} · {item['score']:.3f}<br>{escape(item['label'] or '—')}{mark}"))
    return (f'<div class="query"><p class="query-text">“{escape(query["caption"])}”{label} '
            f'<span class="legend">its image ranks #{query["paired_rank"]}</span></p>'
            f'<div class="cards">{"".join(cards)}</div></div>')


def _image_query(query: dict) -> str:
    tick = ' <span class="tag">✓</span>'
    rows = "".join(f"<tr><td>{escape(p['label'])}{tick if p['correct'] else ''}</td>"
                   f"<td>{100 * p['probability']:.1f}%</td></tr>" for p in query["predictions"])
    hit = " correct" if query["predictions"] and query["predictions"][0]["correct"] else ""
    return _card(query, f" wide{hit}", f"true: <strong>{escape(query['label'])}</strong><table>{rows}</table>")


def _card(item: dict, kind: str, text: str) -> str:
    if item["thumbnail"]:
        picture = f'<img alt="{escape(item["id"])}" src="data:image/jpeg;base64,{item["thumbnail"]}">'
    else:
        picture = '<div class="missing">image unreadable</div>'
    attribution = " · ".join(escape(v) for v in (item.get("source"), item.get("license")) if v) or "source unknown"
    return (f'<figure class="card{kind}">{picture}<figcaption>{text}'
            f'<div class="attribution">{attribution}</div></figcaption></figure>')
