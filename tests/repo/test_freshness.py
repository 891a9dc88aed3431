"""TUF's freshness, rollback and mix-and-match rules on signed documents (pure)."""

from __future__ import annotations

import pytest

from btrdelta import trust
from btrdelta.errors import SignatureError, StreamFormatError
from btrdelta.repo.freshness import TrustedState, check_index, check_timestamp
from btrdelta.repo.model import Index, IndexVersion, Timestamp
from btrdelta.repo.signing import CONTEXT_INDEX, CONTEXT_TIMESTAMP, open_document, sign_document

NOW = 1_800_000_000
H = "cd" * 32


def _ts(version: int = 3, index_version: int = 5, expires: int = NOW + 60) -> Timestamp:
    return Timestamp(version, expires, index_version, 100, H)


def _index(version: int = 5, expires: int = NOW + 3600) -> Index:
    return Index(version, expires, ("A" * 43 + "=",), (IndexVersion("a", 1, ()),), ())


def test_fresh_state_passes() -> None:
    trusted = TrustedState(5, 3, H)
    check_timestamp(_ts(), now=NOW, trusted=trusted)
    check_index(_index(), _ts(), H, now=NOW, trusted=trusted, source="i")


@pytest.mark.parametrize(("ts", "message"), [
    (_ts(version=2), "older than version 3"),
    (_ts(expires=NOW), "expired"),
    (_ts(index_version=4), "rollback"),
])
def test_timestamp_refusals(ts: Timestamp, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        check_timestamp(ts, now=NOW, trusted=TrustedState(5, 3, H))


@pytest.mark.parametrize(("index", "digest", "message"), [
    (_index(version=4), H, "mixed"),
    (_index(), "ef" * 32, "signed twice"),
    (_index(expires=NOW - 1), H, "index expired"),
])
def test_index_refusals(index: Index, digest: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        check_index(index, _ts(), digest, now=NOW, trusted=TrustedState(5, 3, H), source="i")


def test_signatures_bind_the_role_and_the_content() -> None:
    root, other = trust.generate_key(), trust.generate_key()
    doc = sign_document(_index().encode(), [root], CONTEXT_INDEX)
    assert open_document(doc, "i", [root.public_key()], CONTEXT_INDEX) == _index().encode()
    with pytest.raises(SignatureError):  # a timestamp signature never passes for an index
        open_document(doc, "i", [root.public_key()], CONTEXT_TIMESTAMP)
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        open_document(doc, "i", [other.public_key()], CONTEXT_INDEX)
    tampered = doc.replace(b'"version":5', b'"version":6')
    assert tampered != doc
    with pytest.raises(SignatureError):
        open_document(tampered, "i", [root.public_key()], CONTEXT_INDEX)
    with pytest.raises(StreamFormatError):
        open_document(b"[]", "i", [root.public_key()], CONTEXT_INDEX)
    # key order and layout of the file do not matter: the canonical form is what is signed
    import json

    relaid = json.dumps(json.loads(doc), indent=None).encode()
    assert open_document(relaid, "i", [root.public_key()], CONTEXT_INDEX)["version"] == 5
