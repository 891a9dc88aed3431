"""``repo sign``: a new signed index (root key), and a fresh timestamp (timestamp key).

With the root key, the catalog is projected onto bins and ``index/<N>.json`` (N one above
any index written before), signed, and a timestamp naming it is written. With only the
timestamp key (the cron job), ``timestamp.json`` is re-signed for the current index with a
new version and expiry; the key must be one the current index lists. Order of writes:
bins, index, then ``timestamp.json`` (renamed into place), so a mirror never serves a
timestamp naming files that are not there yet, as long as it syncs ``timestamp.json``
last (``docs/repository.md``).
"""

from __future__ import annotations

import re
import time

import blake3

from .. import trust
from ..errors import BtrdeltaError
from ..fs.atomic import write_atomic
from ..repo.catalog import build_metadata
from ..repo.model import Timestamp, format_time
from ..repo.signing import CONTEXT_INDEX, CONTEXT_TIMESTAMP, sign_document
from .publish import Repo

__all__ = ["sign_repo"]

_INDEX_NAME = re.compile(r"(\d+)\.json")


def _next_index_version(repo: Repo, current: int) -> int:
    found = [int(m.group(1)) for p in (repo.root / "index").glob("*.json")
             if (m := _INDEX_NAME.fullmatch(p.name))]
    return max([current, *found]) + 1


def sign_repo(root: str, *, root_key: str | None, timestamp_key: str | None,
              expires: int, index_expires: int, now: float | None = None) -> dict[str, object]:
    """Sign (see the module docstring); returns what is signed now: ``index_version``,
    ``versions`` (how many the index lists), ``timestamp_version``, ``timestamp_expires``
    (UTC, as metadata writes it)."""
    repo = Repo(root)
    when = int(time.time() if now is None else now)
    with repo.locked():
        cat = repo.load()
        if root_key is not None:
            pending = [v.name for v in cat.versions if v.pending or not v.measured]
            if pending:
                raise BtrdeltaError(f"versions with delta jobs pending: {', '.join(pending)} "
                                    "(finish them with `repo add REPO VERSION`)")
            if not cat.versions:
                raise BtrdeltaError("nothing to sign: the repository has no versions")
            rkey = trust.load_private_key(root_key)
            tkey = trust.load_private_key(timestamp_key) if timestamp_key else rkey
            version = _next_index_version(repo, cat.index_version)
            index, bins = build_metadata(cat, version=version, expires=when + index_expires,
                                         timestamp_keys=(trust.public_key_text(tkey),))
            for ref, data in bins:
                if not (repo.root / ref.path).exists():
                    repo.write_artifact("bins", ref.blake3, "json", data)
            (repo.root / "index").mkdir(exist_ok=True)
            index_bytes = sign_document(index.encode(), [rkey], CONTEXT_INDEX)
            write_atomic(repo.root / "index" / f"{version}.json", index_bytes)
            cat.index_version, cat.index_expires = version, index.expires
            cat.signed_versions = len(cat.versions)
        else:
            if timestamp_key is None:
                raise BtrdeltaError("give --key (a new index) or --timestamp-key")
            if not cat.index_version:
                raise BtrdeltaError("no signed index yet: sign one with --key first")
            tkey = trust.load_private_key(timestamp_key)
            path = repo.root / "index" / f"{cat.index_version}.json"
            index_bytes = path.read_bytes()
            _check_listed(index_bytes, str(path), tkey)
        ts = Timestamp(cat.timestamp_version + 1, when + expires, cat.index_version,
                       len(index_bytes), blake3.blake3(index_bytes).hexdigest())
        write_atomic(repo.root / "timestamp.json",
                      sign_document(ts.encode(), [tkey], CONTEXT_TIMESTAMP))
        cat.timestamp_version, cat.timestamp_expires = ts.version, ts.expires
        repo.save(cat)
        repo.write_html(cat)
    return {"index_version": cat.index_version, "versions": cat.signed_versions,
            "timestamp_version": ts.version, "timestamp_expires": format_time(ts.expires)}


def _check_listed(index_bytes: bytes, source: str, key: trust.PrivateKey) -> None:
    """The timestamp key must be one the current index lists."""
    from ..repo.canonical import Fields, parse_json

    signed = Fields(parse_json(index_bytes, source), source).get("signed")
    listed = signed.get("timestamp_keys", []) if isinstance(signed, dict) else []
    if trust.public_key_text(key) not in listed:
        raise BtrdeltaError("this timestamp key is not one the current index lists "
                            "(sign a new index with --key to change it)", path=source)
