"""The JSON files btrdelta reads from a disk or a server, damaged in the ways ``json.loads``
itself does not turn into a ``ValueError``: nested deeper than the decoder recurses
(``RecursionError``), a number out of a float's range where an integer is read
(``OverflowError``), a UUID of the wrong type (``AttributeError``). Each reader turns them
into its one-line error naming the file (the CLI printed "internal error" before).
The device state file has its own tests (tests/device/test_state_file.py); the repository's
metadata goes through repo.canonical.parse_json (tests/repo)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta.errors import BtrdeltaError, SignatureError, StreamFormatError

NESTED = b"[" * 50_000  # (under every size limit: the signature's is 64 KiB)


def _signature(tmp_path: Path, data: bytes) -> None:
    from btrdelta.trust import Signature

    Signature.decode(data, source="x.sig")


def _registry(tmp_path: Path, data: bytes) -> None:
    from btrdelta.receive.registry import REGISTRY_NAME, Registry

    (tmp_path / REGISTRY_NAME).write_bytes(data)
    Registry(tmp_path).entries()


def _cursors(tmp_path: Path, data: bytes) -> None:
    from btrdelta.send.store import SendshotStore

    (tmp_path / "cursors.json").write_bytes(data)
    SendshotStore(tmp_path).cursors()


def _replica(tmp_path: Path, data: bytes) -> None:
    from btrdelta.update.replica import STATE_FILE, Replica

    (tmp_path / STATE_FILE).write_bytes(data)
    Replica(tmp_path, backend="dir")


def _backups(tmp_path: Path, data: bytes) -> None:
    from btrdelta.device.backup import _Store

    (tmp_path / "home.backups.json").write_bytes(data)
    _Store(str(tmp_path)).index("home")


READERS: dict[str, tuple[Callable[[Path, bytes], None], type[BtrdeltaError]]] = {
    "signature": (_signature, SignatureError),
    "registry": (_registry, StreamFormatError),
    "cursors": (_cursors, StreamFormatError),
    "replica state": (_replica, StreamFormatError),
    "backup index": (_backups, StreamFormatError),
}


@pytest.mark.parametrize("reader", READERS)
def test_nested_too_deep(reader: str, tmp_path: Path) -> None:
    read, error = READERS[reader]
    with pytest.raises(error) as info:
        read(tmp_path, NESTED)
    assert "\n" not in str(info.value)


def test_partial_meta_nested_too_deep(tmp_path: Path) -> None:
    """A replication receiver's partial transfer (it is discarded with a warning)."""
    from btrdelta.update.partial import META, PARTIAL_DIR, Damaged, PartialTransfer

    (tmp_path / PARTIAL_DIR).mkdir()
    (tmp_path / PARTIAL_DIR / META).write_bytes(NESTED)
    with pytest.raises(Damaged, match="not JSON"):
        PartialTransfer(tmp_path, "dir").load()


@pytest.mark.parametrize("entry", [
    {"uuid": 5}, {"uuid": ["x"]}, {"ctransid": 1e999}, {"ino": 1e999},
    {"received_at": "soon"},
])
def test_registry_entry_of_the_wrong_type(entry: dict[str, object], tmp_path: Path) -> None:
    good = {"name": "sv", "uuid": "0" * 32, "ctransid": 7, "parent_uuid": None, "ino": 256}
    text = json.dumps({"subvols": [{**good, **entry}]}).replace("Infinity", "1e999")
    with pytest.raises(StreamFormatError, match="invalid subvolume registry") as info:
        _registry(tmp_path, text.encode())
    assert str(tmp_path) in str(info.value)
