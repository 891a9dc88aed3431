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


def test_a_version_s_full_download_is_its_solid_full_and_the_storage_counts_it() -> None:
    """A version with a solid full: its row says what a first install downloads (full
    index + solid full), not its chunks; the storage table lists the solid fulls and its
    total counts them."""
    from btrdelta.repo.solid import Frame, Solid

    cat = _catalog(2)
    cat.versions[1].solid = Solid.make("cd" * 32, [Frame(0, 70000, 0, 3)])
    page = render_html(cat)
    rows = re.findall(r'<tr class="version">.*?</tr>', page)
    assert "<td class=n>244.1 KiB</td>" in rows[0]  # (250,001 B: its chunks)
    assert "<td class=n>69.2 KiB</td>" in rows[1]  # (900 + 70,000 B)
    assert re.search(r"solid fulls[^<]*</td><td class=n>68\.4 KiB<", page)
    packs, fidx, deltas = 5000, 2 * 900, sum(1000 * (2 - a) for a in delta_sources(2))
    total = (packs + fidx + 70000 + deltas) / 1024
    assert f"<tr><td>total</td><td class=n>{total:.1f} KiB</td></tr>" in page
