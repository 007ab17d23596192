"""report.html as a browser shows it: headless Chromium loads every image with no console message or fetch.

The page has no script of its own, so the check runs in a copy of it with one script appended: on `load` it
writes what it found (each image's naturalWidth, any resource fetched, any error event) into the DOM, which
`--dump-dom` prints. Chromium's console goes to stderr (`--enable-logging=stderr`); the page has no script to
log anything, so any console line there (a blocked fetch, a broken image) is a failure. A screenshot of the
real page is kept in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_html import sample_report

from clipmed.report.html import write_html_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WIDTH = 1280  # the same for the run that measures the page height and for the screenshot
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars",
         "--disable-dev-shm-usage",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
CHECK = """<script>
const errors = [];
addEventListener("error", e => errors.push(String(e.message || (e.target && e.target.outerHTML))), true);
addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "clipmed-check";
  out.textContent = JSON.stringify({
    images: [...document.images].map(img => ({alt: img.alt, width: img.naturalWidth, complete: img.complete})),
    fetched: performance.getEntriesByType("resource").map(entry => entry.name),
    errors, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (apt-get install chromium; .ci/run does)")


def _chromium(tmp_path: Path, page: Path, *options: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile every launch
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *options, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)


def test_report_html_renders_in_chromium(tmp_path, synthetic_dataset):
    out = tmp_path / "out"
    out.mkdir()
    page = write_html_report(out, *sample_report(out, synthetic_dataset))
    html = page.read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECK + "</body>").replace(
        "default-src 'none'", "default-src 'none'; script-src 'unsafe-inline'"))

    result = _chromium(tmp_path, checked, "--dump-dom", f"--window-size={WIDTH},900")
    found = re.search(r'<pre id="clipmed-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the check did not run; chromium said:\n{result.stderr[-3000:]}"
    check = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert len(check["images"]) == html.count("<img ") > 2
    assert [img for img in check["images"] if not (img["complete"] and img["width"] > 0)] == []
    assert check["fetched"] == [] and check["errors"] == []
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report_html.png"
    screenshot.unlink(missing_ok=True)
    _chromium(tmp_path, page, f"--screenshot={screenshot}", f"--window-size={WIDTH},{min(check['height'], 16000)}")
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
