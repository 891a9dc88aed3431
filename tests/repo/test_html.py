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
