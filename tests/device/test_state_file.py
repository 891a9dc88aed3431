"""The device state file ``.btrdelta/state.json`` as a bad disk or a hand edit leaves it:
every damaged file is refused by ``load_state`` with one error naming the file (never a
``KeyError``, ``OverflowError`` or ``RecursionError`` out of a command halfway through), or
read as a state whose every field has its type and writes back (``save_state``).
No btrfs needed: the file's reading is plain I/O on a directory laid out as a device's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from btrdelta.device.layout import Layout
from btrdelta.device.state import (
    DeviceState,
    RootInfo,
    StateSubvol,
    load_state,
    save_state,
)
from btrdelta.errors import StreamFormatError
from tests.cli.test_mutations import mutations

N = int(os.environ.get("BTRDELTA_MUTATIONS", "24"))


def _layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "top")
    layout.meta.mkdir(parents=True)
    return layout


def _state() -> DeviceState:
    st = DeviceState(tries=3, hook="/usr/lib/hook",
                     state=[StateSubvol("etc", "/etc"), StateSubvol("home", "/home", "bind")],
                     roots={"a": RootInfo("1", "u-a", "s" * 64, 1.5e9, "good", "1.stream"),
                            "b": RootInfo("2", "u-b", "t" * 64, 1.6e9, "new", "2.delta")},
                     pending={"op": "install", "slot": "b", "started": 1.7e9})
    st.note("install", slot="b")
    return st


def _checked(st: DeviceState) -> None:
    """Every field of its type (what the commands take for granted)."""
    assert type(st.tries) is int
    assert st.tries >= 1
    assert st.hook is None or isinstance(st.hook, str)
    assert type(st.generation) is int
    assert st.pending is None or isinstance(st.pending, dict)
    assert all(isinstance(e, dict) for e in st.log)
    assert all(isinstance(e[k], str) for e in st.log for k in ("event", "slot", "root")
               if k in e)
    for s in st.state:
        assert all(isinstance(v, str) for v in (s.name, s.path, s.mode))
    for info in st.roots.values():
        assert all(isinstance(v, str) for v in (info.release, info.uuid, info.tree_sum,
                                                info.verdict, info.source))
        assert type(info.installed) is float


def test_round_trip(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    save_state(layout, _state())
    st = load_state(layout)
    _checked(st)
    assert st.roots["b"].verdict == "new"
    assert st.state[1].mode == "bind"


@pytest.mark.parametrize(("what", "edit"), [
    ("nested", lambda doc: "[" * 200_000),
    ("tries 1e999", lambda doc: json.dumps(doc).replace('"tries": 3', '"tries": 1e999')),
    ("tries true", lambda doc: json.dumps({**doc, "tries": True})),
    ("tries 0", lambda doc: json.dumps({**doc, "tries": 0})),
    ("tries missing", lambda doc: json.dumps({k: v for k, v in doc.items() if k != "tries"})),
    ("hook a list", lambda doc: json.dumps({**doc, "hook": ["sh", "-c", "x"]})),
    ("roots a list", lambda doc: json.dumps({**doc, "roots": []})),
    ("root a string", lambda doc: json.dumps({**doc, "roots": {"a": "good"}})),
    ("root field unknown", lambda doc: json.dumps({**doc, "roots": {"a": {"x": 1}}})),
    ("release a number", lambda doc: json.dumps({**doc, "roots": {"a": {"release": 2}}})),
    ("verdict unknown", lambda doc: json.dumps({**doc, "roots": {"a": {"verdict": "ok"}}})),
    ("state a dict", lambda doc: json.dumps({**doc, "state": {"etc": "/etc"}})),
    ("state path a number", lambda doc: json.dumps(
        {**doc, "state": [{"name": "etc", "path": 1}]})),
    ("state path relative", lambda doc: json.dumps(
        {**doc, "state": [{"name": "etc", "path": "etc"}]})),
    ("pending a list", lambda doc: json.dumps({**doc, "pending": ["install"]})),
    ("generation a string", lambda doc: json.dumps({**doc, "generation": "7"})),
    ("log entries numbers", lambda doc: json.dumps({**doc, "log": [1, 2]})),
    ("log event a list", lambda doc: json.dumps({**doc, "log": [{"event": ["init"]}]})),
    ("log slot an object", lambda doc: json.dumps(
        {**doc, "log": [{"event": "mark-good", "slot": {"a": 1}}]})),
    ("not UTF-8", lambda doc: b"\xff" + json.dumps(doc).encode()),
])
def test_damaged_fields_are_one_error_naming_the_file(tmp_path: Path, what: str,
                                                     edit: object) -> None:
    layout = _layout(tmp_path)
    save_state(layout, _state())
    doc = json.loads(layout.state_file.read_bytes())
    text = edit(doc)  # type: ignore[operator]
    layout.state_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StreamFormatError) as info:
        load_state(layout)
    message = str(info.value)
    assert "\n" not in message, (what, message)
    assert str(layout.state_file) in message, (what, message)


def test_damaged_bytes(tmp_path: Path) -> None:
    """Truncated, flipped, overwritten: refused (one error naming the file) or a state of
    well-typed fields that writes back."""
    layout = _layout(tmp_path)
    save_state(layout, _state())
    data = layout.state_file.read_bytes()
    refused = 0
    for what, damaged in mutations(data, 8 * N, "device-state"):
        layout.state_file.write_bytes(damaged)
        try:
            st = load_state(layout)
        except StreamFormatError as exc:
            message = str(exc)
        else:
            message = ""
        if message:
            assert "\n" not in message, what
            assert str(layout.state_file) in message, what
            refused += 1
            continue
        _checked(st)
        save_state(layout, st)
        _checked(load_state(layout))
    assert refused >= 4 * N  # (most damage is not JSON any more)
