"""Format 4 is frozen: the committed deltas (tests/data/deltas) expand bit for bit.

They were made by ``delta make`` from kernel-made A->B streams of a rebuilt release
(``tests/data/make_deltas.py``); MANIFEST.json holds the size, command count and SHA-256 of
each kernel stream, which the expansion must reproduce exactly against the old tree
(``release.A.tar.gz``). Receiving them as records must give the records of that stream.
Between them they hold every format-4 record and carrier form: STREAM, ZCMDS, PATCH + PDATA
(a patch above 64 KiB), CPATCH (``same`` and patched, implied PWRITEs), PWRITE, PENC, DEND,
raw commands at top level (level 0), and the folded commands (previous path, orphan names,
times, UNLINK and RENAME name references).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from btrdelta._value import field_names
from btrdelta.delta import expand_events, expand_to, open_delta
from btrdelta.errors import StreamFormatError, UnsupportedVersionError
from btrdelta.stream import StreamReader
from btrdelta.stream.records import Record
from btrdelta.testing.tarballs import extract_tar
from tests.conftest import DATA

DELTAS = DATA / "deltas"
MANIFEST: dict[str, Any] = json.loads((DELTAS / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frozen-old")
    extract_tar(DELTAS / MANIFEST["old"], root)
    return root


def _entries() -> list[Any]:
    return [pytest.param(e, id=e["file"]) for e in MANIFEST["deltas"]]


def _expanded(delta: bytes, old: Path) -> bytes:
    out = io.BytesIO()
    size = expand_to(open_delta(io.BytesIO(delta)), old, out.write)
    assert size == len(out.getvalue())
    return out.getvalue()


def _plain(ev: object) -> tuple[Any, ...]:
    """A record or header as comparable values (file data as bytes)."""
    return (type(ev).__name__, *(bytes(v) if isinstance(v, memoryview) else v
                                 for v in (getattr(ev, k) for k in field_names(type(ev)))))


@pytest.mark.parametrize("entry", _entries())
def test_frozen_delta_expands_bit_for_bit(entry: dict[str, Any], old_tree: Path) -> None:
    delta = (DELTAS / entry["file"]).read_bytes()
    assert delta[17:21] == int(entry.get("format", MANIFEST["format"])).to_bytes(4, "little")
    stream = _expanded(delta, old_tree)
    want = entry["expanded"]
    assert len(stream) == want["size"]
    assert hashlib.sha256(stream).hexdigest() == want["sha256"]
    assert sum(1 for _ in StreamReader(io.BytesIO(stream))) == want["commands"]


@pytest.mark.parametrize("version", [1, 2, 3, 11, 0])
def test_other_versions_are_refused_with_what_to_do(version: int, old_tree: Path) -> None:
    """Formats 1-3 were never released: their deltas are refused, saying to make them
    again; an unknown version is refused as such. Nothing is expanded."""
    delta = (DELTAS / MANIFEST["deltas"][0]["file"]).read_bytes()
    out = io.BytesIO()
    with pytest.raises(UnsupportedVersionError) as err:
        expand_to(open_delta(io.BytesIO(delta[:17] + version.to_bytes(4, "little")
                                        + delta[21:]), source="old.delta"), old_tree, out.write)
    text = str(err.value)
    assert text.startswith("old.delta: offset 0: ")
    assert f"delta format version {version}" in text
    assert ("make the delta again" in text) == (version in (1, 2, 3))
    assert out.getvalue() == b""


@pytest.mark.parametrize("entry", _entries())
def test_frozen_delta_received_as_the_streams_records(
    entry: dict[str, Any], old_tree: Path
) -> None:
    delta = (DELTAS / entry["file"]).read_bytes()
    stream = _expanded(delta, old_tree)
    got = [_plain(ev) for ev in expand_events(io.BytesIO(delta), old_tree)]
    want = [_plain(ev) for ev in StreamReader(io.BytesIO(stream)).events()]
    assert got == want
    assert sum(isinstance(ev, Record) for ev in
               expand_events(io.BytesIO(delta), old_tree)) == entry["expanded"]["commands"]


def test_x86_carrier_is_refused_in_format_5(old_tree: Path) -> None:
    """Carrier codec 3 (LZMA2 after the x86 converter) is format 6's: a format-5 header on
    it is a clear error, nothing expanded."""
    entry = next(e for e in MANIFEST["deltas"] if e.get("format") == 6)
    delta = (DELTAS / entry["file"]).read_bytes()
    out = io.BytesIO()
    with pytest.raises(StreamFormatError, match=r"carrier codec 3 .* is invalid"):
        expand_to(open_delta(io.BytesIO(delta[:17] + (5).to_bytes(4, "little") + delta[21:])),
                  old_tree, out.write)
    assert out.getvalue() == b""
