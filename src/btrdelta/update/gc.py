"""``repo gc``: remove from a repository the files nothing refers to any more.

What stays (everything else in the mirror directories goes):

* the artifacts of the catalog's versions, signed yet or not: each version's full index,
  the packs the catalog lists, every delta made;
* the newest ``keep_indexes`` signed indexes (``index/<N>.json``; a mirror a little behind
  still serves the one its timestamp names), the newest being the one ``timestamp.json``
  names, and the bins they name; an index above that one (a ``repo sign`` cut short: its
  number is never used again, so it stays); ``timestamp.json`` and ``index.html``.

Garbage comes from ``repo add`` runs cut short (packs and a full index written before the
catalog named them), older signed indexes and the bins only they named, and temporary
files of killed writers (``.NAME.tmp-PID``). In the publisher's directory, the scratch
space (``.btrdelta/tmp``) and the job directories of versions with no pending job go too.
All under the repository's lock, so no ``repo add`` or ``repo sign`` runs meanwhile; what a
kept index or the catalog names is never touched, so mirrors may copy at any time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..fs.remove import remove_path
from ..repo.canonical import Fields, parse_json
from ..repo.catalog import Catalog
from ..repo.model import Index
from .publish import Repo

__all__ = ["GcReport", "collect_garbage"]

_INDEX_NAME = re.compile(r"(\d+)\.json")
_KINDS = ("packs", "fulls", "solids", "deltas", "bins", "index")


@dataclass(slots=True)
class GcReport:
    """What a collection removed (or, dry, would remove): paths relative to the
    repository, and their bytes."""

    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    kept_indexes: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"removed": self.removed, "bytes": self.bytes,
                "kept_indexes": self.kept_indexes}


def _kept_indexes(root: Path, current: int, keep: int) -> tuple[list[int], set[str]]:
    """The index versions kept: the newest ``keep`` up to ``current`` (the one the timestamp
    names), and any above it (from a ``repo sign`` cut short: never named, but its number
    must not come back with other content); and the paths of the bins the former name."""
    found = sorted(int(m.group(1)) for p in (root / "index").glob("*.json")
                   if (m := _INDEX_NAME.fullmatch(p.name)))
    named = [n for n in found if n <= current][-keep:]
    bins: set[str] = set()
    for n in named:
        path = root / "index" / f"{n}.json"
        signed = Fields(parse_json(path.read_bytes(), str(path)), str(path)).get("signed")
        index = Index.decode(signed, str(path))
        bins.update(b.ref.path for b in index.bins)
    return named + [n for n in found if n > current], bins


def _referenced(cat: Catalog) -> set[str]:
    """Paths of the artifacts of the catalog's versions."""
    out = {f"packs/{p.id}.pack" for p in cat.packs}
    for v in cat.versions:
        out.add(f"fulls/{v.full_id}.fidx")
        if v.solid is not None:
            out.add(v.solid.path)
        out.update(f"deltas/{h}.delta" for h, _n in v.deltas.values())
    return out


def collect_garbage(root: str | os.PathLike[str], *, keep_indexes: int = 2,
                    dry_run: bool = False) -> GcReport:
    """Remove the unreferenced files of repository ``root`` (see the module docstring)."""
    if keep_indexes < 1:
        raise ValueError("keep_indexes must be at least 1 (the current index)")
    repo = Repo(root)
    report = GcReport()
    with repo.locked():
        cat = repo.load()
        kept, bins = _kept_indexes(repo.root, cat.index_version, keep_indexes)
        report.kept_indexes = kept
        keep = _referenced(cat) | bins | {f"index/{n}.json" for n in kept}
        for kind in _KINDS:
            d = repo.root / kind
            for entry in sorted(os.listdir(d)) if d.is_dir() else ():
                rel = f"{kind}/{entry}"
                if rel not in keep:
                    _remove(repo.root / rel, rel, report, dry_run)
        for entry in sorted(os.listdir(repo.root)):  # temporary files of killed writers
            if entry.startswith(".") and ".tmp-" in entry:
                _remove(repo.root / entry, entry, report, dry_run)
        if not dry_run:
            remove_path(repo.tmp, ignore_errors=True)
            pending = {v.name for v in cat.versions if v.pending or not v.measured}
            for job_dir in sorted(repo.jobs.iterdir()) if repo.jobs.is_dir() else ():
                if job_dir.name not in pending:
                    remove_path(job_dir, ignore_errors=True)
    return report


def _remove(path: Path, rel: str, report: GcReport, dry_run: bool) -> None:
    st = path.lstat()
    report.removed.append(rel)
    report.bytes += st.st_size
    if not dry_run:
        if path.is_dir() and not path.is_symlink():
            remove_path(path)
        else:
            path.unlink()
