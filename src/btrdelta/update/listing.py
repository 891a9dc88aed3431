"""``repo ls``: what a repository holds, from the publisher's catalog (a local REPO) or from
the signed metadata on a mirror (a URL)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import BtrdeltaError
from ..repo.catalog import Catalog
from ..repo.model import ArtifactRef
from ..repo.solid import Solid

__all__ = ["list_repo"]


def _solid(solid: Solid | None) -> dict[str, Any] | None:
    return None if solid is None else {"path": solid.path, "bytes": solid.length,
                                       "frames": len(solid.frames)}


def _catalog_listing(cat: Catalog, where: str) -> dict[str, Any]:
    versions = []
    for pos, v in enumerate(cat.versions, 1):
        versions.append({
            "position": pos, "name": v.name, "identity": v.identity,
            "stream_size": v.stream_size, "full_bytes": v.full_bytes,
            "full": ArtifactRef.make("fulls", v.full_id, v.full_length).path,
            "solid": _solid(v.solid),
            "packs": [f"packs/{k}.pack" for k in v.packs],
            "deltas": [{"from": cat.versions[a - 1].name, "bytes": n,
                        "path": ArtifactRef.make("deltas", h, n).path}
                       for a, (h, n) in sorted(v.deltas.items(), reverse=True)],
            "pending": [cat.versions[a - 1].name for a in sorted(v.pending, reverse=True)],
            # an add cut short (Ctrl-C) or waiting for its --plan-only jobs: repo sign
            # refuses it until `repo add REPO VERSION` finishes it
            "unfinished": bool(v.pending) or not v.measured,
        })
    signed = (f"signed index version {cat.index_version} ({cat.signed_versions} versions)"
              if cat.index_version else "not signed")
    return {
        "repository": where, "signed": signed, "versions_count": len(cat.versions),
        "deltas_count": sum(len(v.deltas) for v in cat.versions),
        "storage": {
            "packs": sum(p.length for p in cat.packs),
            "full_indexes": sum(v.full_length for v in cat.versions),
            "solids": sum(v.solid.length for v in cat.versions if v.solid is not None),
            "deltas": sum(n for v in cat.versions for _h, n in v.deltas.values()),
        },
        "versions": versions,
    }


def _remote_listing(url: str, *, key: str | None) -> dict[str, Any]:
    from .. import trust
    from ..repo.canonical import Fields, parse_json
    from ..repo.freshness import TrustedState
    from ..repo.metadata import MetaCache, get_timestamp, load_index, version_records
    from ..repo.mirror import Mirrors
    from ..repo.model import Index, Timestamp
    from ..repo.rootchain import current_root

    mirrors = Mirrors([url])
    cache = MetaCache(None)
    try:
        if key is not None:
            keys = current_root(mirrors, [trust.load_root_key(key)], None)
            v = load_index(mirrors, keys, TrustedState(), cache)
            index, ts, note = v.index, v.timestamp, "signatures verified"
        else:
            raw = get_timestamp(mirrors, mirrors.urls[0])
            name = f"{mirrors.urls[0].rstrip('/')}/timestamp.json"  # (it said timestamp.json)
            ts = Timestamp.decode(Fields(parse_json(raw, name), name).get("signed"), name)
            data = mirrors.fetch(ts.index_path, length=ts.index_length,
                                 digest=ts.index_blake3)
            name = f"{mirrors.urls[0].rstrip('/')}/{ts.index_path}"
            index = Index.decode(Fields(parse_json(data, name), name).get("signed"), name)
            note = "signatures NOT verified (give --key)"
        records = version_records(mirrors, index, cache, range(1, len(index.versions) + 1))
    finally:
        mirrors.close()
    names = [v.name for v in index.versions]
    versions: list[dict[str, Any]] = []
    for pos, rec in sorted(records.items()):
        versions.append({
            "position": pos, "name": rec.name, "identity": rec.identity,
            "stream_size": rec.stream_size, "full_bytes": index.versions[pos - 1].full_bytes,
            "full": rec.full.path,
            "solid": _solid(rec.solid),
            "deltas": [{"from": names[d.source - 1], "bytes": d.ref.length,
                        "path": d.ref.path} for d in rec.deltas],
            "pending": [],
            "unfinished": False,
        })
    return {
        "repository": url,
        "signed": f"index version {index.version}, timestamp version {ts.version}; {note}",
        "versions_count": len(versions), "deltas_count": sum(len(v["deltas"]) for v in versions),
        "storage": {
            "full_indexes": sum(r.full.length for r in records.values()),
            "solids": sum(r.solid.length for r in records.values() if r.solid is not None),
            "deltas": sum(d.ref.length for r in records.values() for d in r.deltas),
        },
        "versions": versions,
    }


def list_repo(location: str, *, key: str | None = None) -> dict[str, Any]:
    """A JSON-able listing of the repository at ``location`` (directory or URL)."""
    from ..repo.mirror import local_path

    directory = local_path(location)
    if directory is None:
        return _remote_listing(location, key=key)
    from .publish import Repo

    repo = Repo(directory)
    published = os.path.exists(os.path.join(directory, "timestamp.json"))
    if published and (key is not None or not repo.catalog_path.exists()):
        # a mirror's copy (no publisher catalog), or --key: the signed index, verified, as
        # a client sees it (not the publisher's catalog, which nothing signs)
        return _remote_listing(directory, key=key)
    if key is not None and repo.catalog_path.exists():
        raise BtrdeltaError("--key verifies the signed index, and this repository has none "
                            "yet (btrdelta repo sign REPO --key ROOT_KEY)",
                            path=os.fspath(directory))
    if not os.path.isdir(directory):
        raise BtrdeltaError("no such directory" if not os.path.exists(directory)
                            else "not a directory", path=os.fspath(directory))
    if not repo.catalog_path.exists():
        raise BtrdeltaError("not a repository (no .btrdelta/catalog.json of `repo init`, "
                            "no timestamp.json of a mirror)", path=os.fspath(directory))
    return _catalog_listing(repo.load(), location)
