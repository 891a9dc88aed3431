"""``index.html`` rendered by headless Chromium: the page loads and shows every version and
the delta graph."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.repo.catalog import Catalog, CatalogVersion, PackEntry
from btrdelta.repo.html import render_html
from btrdelta.repo.layout import delta_sources


def _catalog(n: int) -> Catalog:
    cat = Catalog(ChunkerParams.from_avg(65536), 12, [PackEntry("00" * 32, 160, 5000)])
    for p in range(1, n + 1):
        deltas = {a: ("ab" * 32, 1000 * (p - a)) for a in delta_sources(p)}
        cat.versions.append(CatalogVersion(f"1.{p}<b>", "12" * 32, 300000, "34" * 32, 900,
                                           250000 + p, [], deltas))
    return cat


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI (scripts/sysdeps.sh installs it)")
        pytest.skip("chromium not installed")
    return binary


def test_page_renders_versions_and_graph_in_chromium(tmp_path: Path) -> None:
    cat = _catalog(12)
    page = tmp_path / "index.html"
    page.write_text(render_html(cat))
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    rows = re.findall(r'<tr class="version"><td class="n">(\d+)</td><td>([^<]*)</td>', dom)
    assert [name for _pos, name in rows] == [f"1.{p}&lt;b&gt;" for p in range(1, 13)]
    assert dom.count('class="arc"') == sum(len(delta_sources(p)) for p in range(1, 13))
    assert dom.count('class="node"') == 12
    assert "<b>" not in dom.split("<body>")[1]  # names are escaped, never markup
    assert "12 versions" in dom


_MEASURE = """<script>
var box = document.querySelector('svg').getBoundingClientRect(), out = [];
document.querySelectorAll('text.lbl').forEach(function (t) {
  var r = t.getBoundingClientRect();
  if (r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.top < box.top - 0.5
      || r.bottom > box.bottom + 0.5) out.push(t.textContent);
});
document.body.setAttribute('data-clipped', out.join('|') || 'none');
</script>"""


@pytest.mark.parametrize("names", [
    ["bookworm-min", "bookworm-upd", "bookworm-tools"],
    [f"2026.12.{d:02d}-security-rebuild" for d in range(1, 6)],
    ["1", "2"],
])
def test_graph_labels_are_inside_the_drawing(tmp_path: Path, names: list[str]) -> None:
    """Each version's label, drawn at -45 degrees under its node, is inside the SVG as
    Chromium lays it out: long names were cut at the drawing's left and bottom edges
    ("okworm-min" for the first version of a Debian repository)."""
    cat = Catalog(ChunkerParams.from_avg(65536), 12, [PackEntry("00" * 32, 160, 5000)])
    for p, name in enumerate(names, 1):
        deltas = {a: ("ab" * 32, 1000 * (p - a)) for a in delta_sources(p)}
        cat.versions.append(CatalogVersion(name, "12" * 32, 300000, "34" * 32, 900,
                                           250000 + p, [], deltas))
    page = tmp_path / "index.html"
    page.write_text(render_html(cat).replace("</body>", _MEASURE + "</body>"))
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    clipped = re.search(r'data-clipped="([^"]*)"', proc.stdout)
    assert clipped is not None, proc.stdout[-2000:]
    assert clipped.group(1) == "none"
