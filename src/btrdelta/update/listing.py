"""``repo ls``: what a repository holds, from the publisher's catalog (a local REPO) or from
the signed metadata on a mirror (a URL)."""

from __future__ import annotations

import os
from typing import Any

from ..repo.catalog import Catalog
from ..repo.model import ArtifactRef

__all__ = ["list_repo"]


def _catalog_listing(cat: Catalog, where: str) -> dict[str, Any]:
    versions = []
    for pos, v in enumerate(cat.versions, 1):
        versions.append({
            "position": pos, "name": v.name, "identity": v.identity,
            "stream_size": v.stream_size, "full_bytes": v.full_bytes,
            "full": ArtifactRef.make("fulls", v.full_id, v.full_length).path,
            "packs": [f"packs/{k}.pack" for k in v.packs],
            "deltas": [{"from": cat.versions[a - 1].name, "bytes": n,
                        "path": ArtifactRef.make("deltas", h, n).path}
                       for a, (h, n) in sorted(v.deltas.items(), reverse=True)],
            "pending": [cat.versions[a - 1].name for a in sorted(v.pending, reverse=True)],
        })
    signed = (f"signed index version {cat.index_version} ({cat.signed_versions} versions)"
              if cat.index_version else "not signed")
    return {
        "repository": where, "signed": signed, "versions_count": len(cat.versions),
        "deltas_count": sum(len(v.deltas) for v in cat.versions),
        "storage": {
            "packs": sum(p.length for p in cat.packs),
            "full_indexes": sum(v.full_length for v in cat.versions),
            "deltas": sum(n for v in cat.versions for _h, n in v.deltas.values()),
        },
        "versions": versions,
    }


def list_repo(location: str) -> dict[str, Any]:
    """A JSON-able listing of the repository at ``location``."""
    from .publish import Repo

    repo = Repo(location)
    if not repo.catalog_path.exists():
        raise FileNotFoundError(os.fspath(repo.catalog_path))
    return _catalog_listing(repo.load(), location)
