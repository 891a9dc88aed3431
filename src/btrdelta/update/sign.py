"""``repo sign``: a new signed index (root key), and a fresh timestamp (timestamp key).

With the root key, the catalog is projected onto bins and ``index/<N>.json`` (N one above
any index written before), signed, and a timestamp naming it is written. With only the
timestamp key (the cron job), ``timestamp.json`` is re-signed for the current index with a
new version and expiry; the key must be one the current index lists. Order of writes:
bins, index, then ``timestamp.json`` (renamed into place), so a mirror never serves a
timestamp naming files that are not there yet, as long as it syncs ``timestamp.json``
last (``docs/repository.md``).

With ``--previous-key OLD`` (and ``--key NEW``) the root key is rotated first:
``root/<N+1>.json`` naming NEW, signed by OLD and NEW, is written before the bins, so a
client that pinned OLD follows the chain to NEW before it reads the index NEW signs.
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
from ..repo.rootchain import latest_root, make_root
from ..repo.signing import CONTEXT_INDEX, CONTEXT_TIMESTAMP, sign_document
from .publish import Repo

__all__ = ["sign_repo"]

_INDEX_NAME = re.compile(r"(\d+)\.json")


def _next_index_version(repo: Repo, current: int) -> int:
    found = [int(m.group(1)) for p in (repo.root / "index").glob("*.json")
             if (m := _INDEX_NAME.fullmatch(p.name))]
    return max([current, *found]) + 1


def _index_signers(repo: Repo, index_version: int) -> set[str]:
    """The key IDs that signed ``index/<index_version>.json`` (none before the first)."""
    from ..repo.canonical import Fields, parse_json

    path = repo.root / "index" / f"{index_version}.json"
    if not index_version or not path.exists():
        return set()
    doc = Fields(parse_json(path.read_bytes(), str(path)), str(path))
    sigs = doc.get("signatures")
    return {str(s.get("key_id")) for s in sigs if isinstance(s, dict)} if isinstance(
        sigs, list) else set()


def _rotate_or_check(repo: Repo, rkey: trust.PrivateKey, previous_key: str | None,
                     index_version: int) -> int:
    """With ``previous_key``: write ``root/<N+1>.json`` naming ``rkey``, signed by both
    (``repo.rootchain``); without: ``rkey`` must be a key of the newest root (before any
    rotation: the key that signed the current index, ``index_version``). Returns the
    root version now current (1: no rotation yet)."""
    latest = latest_root(repo.root)
    current = 1 if latest is None else latest.version
    # root version 1 has no file: its key is the one that signed the current index
    first = _index_signers(repo, index_version) if latest is None else set()
    if previous_key is None:
        if latest is not None and trust.public_key_text(rkey) not in latest.keys:
            raise BtrdeltaError(f"this root key is not one of root version {current}'s "
                                "(it was rotated out: sign with the newest root key)",
                                source=str(repo.root / "root" / f"{current}.json"))
        if first and trust.key_id(rkey) not in first:
            raise BtrdeltaError(
                f"this root key ({trust.key_id(rkey)[:16]}) did not sign index "
                f"{index_version} ({', '.join(k[:16] for k in sorted(first))}): devices "
                "that pinned that key would refuse every new index; sign with it, or "
                "rotate to this key with --previous-key",
                source=str(repo.root / "index" / f"{index_version}.json"))
        return current
    prev = trust.load_private_key(previous_key)
    if latest is not None and trust.public_key_text(prev) not in latest.keys:
        raise BtrdeltaError(f"--previous-key is not a key of root version {current}",
                            source=str(repo.root / "root" / f"{current}.json"))
    if first and trust.key_id(prev) not in first:
        raise BtrdeltaError(f"--previous-key did not sign index {index_version}",
                            source=str(repo.root / "index" / f"{index_version}.json"))
    if trust.key_id(prev) == trust.key_id(rkey):
        raise BtrdeltaError("--previous-key and --key are the same key: nothing to rotate")
    (repo.root / "root").mkdir(exist_ok=True)
    path = repo.root / "root" / f"{current + 1}.json"
    if path.exists():
        raise BtrdeltaError("root version exists already", source=str(path))
    write_atomic(path, make_root(current + 1, [rkey], [prev]))
    return current + 1


def sign_repo(root: str, *, root_key: str | None, timestamp_key: str | None,
              expires: int, index_expires: int, now: float | None = None,
              previous_key: str | None = None) -> dict[str, object]:
    """Sign (see the module docstring); returns what is signed now: ``index_version``,
    ``versions`` (how many the index lists), ``timestamp_version``, ``timestamp_expires``
    (UTC, as metadata writes it), ``root_version``.

    ``previous_key`` (with ``root_key``): rotate the root key from it to ``root_key``
    first (``root/<N>.json``, :mod:`btrdelta.repo.rootchain`)."""
    if previous_key is not None and root_key is None:
        raise BtrdeltaError("--previous-key rotates to --key: give both")
    if expires <= 0 or index_expires <= 0:
        raise BtrdeltaError(f"lifetimes must be more than 0 seconds (timestamp {expires}, "
                            f"index {index_expires})")
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
            root_version = _rotate_or_check(repo, rkey, previous_key, cat.index_version)
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
            latest = latest_root(repo.root)
            root_version = 1 if latest is None else latest.version
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
            "timestamp_version": ts.version, "timestamp_expires": format_time(ts.expires),
            "root_version": root_version}


def _check_listed(index_bytes: bytes, source: str, key: trust.PrivateKey) -> None:
    """The timestamp key must be one the current index lists."""
    from ..repo.canonical import Fields, parse_json

    signed = Fields(parse_json(index_bytes, source), source).get("signed")
    listed = signed.get("timestamp_keys", []) if isinstance(signed, dict) else []
    if trust.public_key_text(key) not in listed:
        raise BtrdeltaError("this timestamp key is not one the current index lists "
                            "(sign a new index with --key to change it)", source=source)
