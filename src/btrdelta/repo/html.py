"""The repository's ``index.html``: what a person browsing the mirror sees (pure).

One static page, no script: the versions, the delta graph drawn as SVG (versions on a line,
oldest left; each delta an arc from its source to its target, thicker for more bytes; under
each version a bar for the size of its full), a table of every version with the size of its
full download (its solid full where there is one) and of each delta into it, and what the
mirror stores. Text is HTML-escaped; version names are restricted to safe characters
anyway.
"""

from __future__ import annotations

import math
from html import escape

from .catalog import Catalog, CatalogVersion
from .model import format_time

__all__ = ["render_html"]

_STEP = 56
_MAX_DRAWN = 240
#: a generous width of one character of the 11px labels, and sin/cos of their -45 degrees:
#: a label reaches this far left of and below its anchor, and the drawing makes room for it
_CHAR = 7.0
_DIAG = math.sqrt(0.5)
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .7em;border-bottom:1px solid #ddd}
th{text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px}svg{border:1px solid #eee;background:#fcfcfc}
.arc{fill:none;stroke:#3b6ea5;stroke-opacity:.55}.full{fill:#c9772b;fill-opacity:.6}
.node{fill:#fff;stroke:#222}.lbl{font-size:11px}
"""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _svg(cat: Catalog) -> str:
    versions = cat.versions
    first = max(0, len(versions) - _MAX_DRAWN)
    drawn = versions[first:]
    if not drawn:
        return "<p>No versions yet.</p>"
    top = 150
    # the labels run down-left from under their version: room for the longest one
    reach = math.ceil(_CHAR * _DIAG * max(len(v.name) for v in drawn)) + 4
    left = max(_STEP, reach)
    width = left + _STEP * len(drawn)
    height = top + 84 + max(46, reach)
    biggest = max(max((n for _, n in v.deltas.values()), default=1) for v in drawn) or 1
    largest_full = max(v.full_bytes for v in drawn) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="delta graph">']

    def x(pos: int) -> int:
        return left + _STEP * (pos - first - 1)

    for i, v in enumerate(drawn):
        pos = first + i + 1
        for a, (_h, n) in sorted(v.deltas.items()):
            if a <= first:
                continue
            x1, x2 = x(a), x(pos)
            h = min(top - 10, 18 + 22 * math.log2(pos - a + 1))
            w = 1 + 5 * n / biggest
            label = f"{versions[a - 1].name} \u2192 {v.name}: {_size(n)}"
            parts.append(f'<path class="arc" d="M{x1},{top} Q{(x1 + x2) / 2},{top - 2 * h} '
                         f'{x2},{top}" stroke-width="{w:.1f}"><title>{escape(label)}</title>'
                         "</path>")
        bar = max(2.0, 60 * v.full_bytes / largest_full)
        parts.append(f'<rect class="full" x="{x(pos) - 6}" y="{top + 8}" width="12" '
                     f'height="{bar:.1f}"><title>{escape(v.name)} full: '
                     f"{_size(v.full_bytes)}</title></rect>")
        parts.append(f'<circle class="node" cx="{x(pos)}" cy="{top}" r="5"/>')
        parts.append(f'<text class="lbl" x="{x(pos)}" y="{top + 84}" text-anchor="end" '
                     f'transform="rotate(-45 {x(pos)} {top + 84})">{escape(v.name)}</text>')
    parts.append("</svg>")
    note = f"<p>Newest {_MAX_DRAWN} versions drawn.</p>" if first else ""
    return note + "".join(parts)


def _first_install(v: CatalogVersion) -> int:
    """What a device that holds nothing downloads for version ``v``."""
    return v.solid.first_install(v.full_length) if v.solid is not None else v.full_bytes


def render_html(cat: Catalog) -> str:
    """The page for the catalog (and its signed state)."""
    rows = []
    for pos, v in enumerate(cat.versions, 1):
        deltas = ", ".join(f"{escape(cat.versions[a - 1].name)}: {_size(n)}"
                           for a, (_h, n) in sorted(v.deltas.items(), reverse=True))
        if v.pending:
            deltas += f" ({len(v.pending)} pending)"
        rows.append(
            f'<tr class="version"><td class="n">{pos}</td><td>{escape(v.name)}</td>'
            f"<td><code>{v.identity[:16]}</code></td><td class=n>{_size(v.stream_size)}</td>"
            f"<td class=n>{_size(_first_install(v))}</td><td>{deltas or '-'}</td></tr>")
    packs = sum(p.length for p in cat.packs)
    deltas_total = sum(n for v in cat.versions for _h, n in v.deltas.values())
    fidx = sum(v.full_length for v in cat.versions)
    solids = sum(v.solid.length for v in cat.versions if v.solid is not None)
    all_fulls = sum(v.full_bytes for v in cat.versions)
    count = sum(len(v.deltas) for v in cat.versions)
    if cat.index_version:
        signed = (f"Signed index version {cat.index_version} ({cat.signed_versions} "
                  f"versions), expires {format_time(cat.index_expires)}; timestamp expires "
                  f"{format_time(cat.timestamp_expires)}.")
    else:
        signed = "Not signed yet (run <code>btrdelta repo sign</code>)."
    per = count / len(cat.versions) if cat.versions else 0.0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>btrdelta repository</title>
<style>{_STYLE}</style></head><body>
<h1>btrdelta repository</h1>
<p id="summary">{len(cat.versions)} versions, {count} deltas ({per:.2f} per version). {signed}</p>
<h2>Delta graph</h2>
{_svg(cat)}
<h2>Versions</h2>
<table id="versions"><tr><th>#</th><th>version</th><th>identity</th><th>stream</th>
<th>full download</th><th>deltas into it (from: size)</th></tr>
{"".join(rows)}
</table>
<h2>Storage</h2>
<table id="storage">
<tr><td>chunk packs (every full, deduplicated)</td><td class=n>{_size(packs)}</td></tr>
<tr><td>full indexes</td><td class=n>{_size(fidx)}</td></tr>
<tr><td>solid fulls (what a first install downloads)</td><td class=n>{_size(solids)}</td></tr>
<tr><td>deltas</td><td class=n>{_size(deltas_total)}</td></tr>
<tr><td>total</td><td class=n>{_size(packs + fidx + solids + deltas_total)}</td></tr>
<tr><td>every full stored on its own, for comparison</td><td class=n>{_size(all_fulls)}</td></tr>
</table>
<p>Update a device: <code>btrdelta update URL DEST --key root.pub</code>.
Format: docs/formats/repository.md.</p>
</body></html>
"""
