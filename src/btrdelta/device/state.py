"""The device state file ``.btrdelta/state.json``: what the tools know of the device.

Owns: the state file's schema (version 1, ``docs/device.md``), reading it (one clear error
for a damaged file), writing it atomically (temporary file in the same directory, fsync,
rename, fsync of the directory: a power cut leaves the old or the new file), and the
``mounts`` file generated from it for the initramfs.

Does not own: which root boots. That is the btrfs default subvolume and the boot-counting
file (:mod:`.boot`); the state file records releases, verdicts and history, and a command
that finds it behind the boot truth (a power cut between the two) repairs it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StreamFormatError
from ..fs.atomic import write_atomic
from .layout import BOOTABLE, DeviceError, Layout

__all__ = [
    "FORMAT",
    "VERSION",
    "DeviceState",
    "RootInfo",
    "StateSubvol",
    "load_state",
    "parse_state_spec",
    "save_state",
]

FORMAT = "btrdelta-device"
VERSION = 1
_MAX_SIZE = 1 << 20
_LOG_KEEP = 64
MODES = ("overlay", "bind")


@dataclass
class StateSubvol:
    """A writable state subvolume: ``state/NAME`` over directory ``path`` of the root.

    ``overlay``: the root's directory is the lower layer, ``state/NAME/upper`` the upper
    (``state/NAME/work`` overlayfs's work directory); empty = the release's content.
    ``bind``: ``state/NAME`` itself is mounted on ``path``; empty = an empty directory.
    """

    name: str
    path: str
    mode: str = "overlay"


@dataclass
class RootInfo:
    """What is known of one bootable root (``roots/NAME``)."""

    release: str = ""
    uuid: str = ""
    tree_sum: str = ""
    installed: float = 0.0
    #: "new" (installed, not yet booted good), "good", "bad"
    verdict: str = "new"
    source: str = ""


@dataclass
class DeviceState:
    """The whole state file."""

    tries: int = 3
    hook: str | None = None
    state: list[StateSubvol] = field(default_factory=list)
    roots: dict[str, RootInfo] = field(default_factory=dict)
    #: an operation between its steps, for recovery: {"op": ..., ...}
    pending: dict[str, Any] | None = None
    generation: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def note(self, event: str, **fields: Any) -> None:
        """Append an event to the log (the last entries are kept)."""
        self.log.append({"time": round(time.time(), 3), "event": event, **fields})
        del self.log[:-_LOG_KEEP]

    def root(self, name: str) -> RootInfo:
        """The record of root ``name`` (an empty one when none)."""
        return self.roots.setdefault(name, RootInfo())

    def to_json(self) -> dict[str, Any]:
        """The document written to disk."""
        doc = asdict(self)
        return {"format": FORMAT, "version": VERSION, **doc}


def parse_state_spec(spec: str) -> StateSubvol:
    """``NAME:PATH[:MODE]`` (e.g. ``etc:/etc:overlay``, ``home:/home:bind``)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise DeviceError(f"state subvolume {spec!r}: expected NAME:/PATH[:overlay|bind]")
    name, path = parts[0], os.path.normpath(parts[1])
    mode = parts[2] if len(parts) == 3 else "overlay"
    if mode not in MODES:
        raise DeviceError(f"state subvolume {spec!r}: mode must be overlay or bind")
    if "/" in name or name in (".", "..") or name.startswith("."):
        raise DeviceError(f"state subvolume {spec!r}: bad name")
    if path == "/":
        raise DeviceError(f"state subvolume {spec!r}: cannot cover the whole root")
    return StateSubvol(name, path, mode)


_VERDICTS = ("new", "good", "bad")


def _typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is a ``kind`` (never a bool for a number), else a ValueError."""
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))):
        raise ValueError(f"{what}: {type(value).__name__} where "
                         f"{getattr(kind, '__name__', 'a number')} is expected")
    return value


def _root_info(name: str, info: Any) -> RootInfo:
    fields = _typed(info, dict, f"roots.{name}")
    kinds: dict[str, Any] = {"release": str, "uuid": str, "tree_sum": str,
                             "installed": (int, float), "verdict": str, "source": str}
    for key, value in fields.items():
        if key not in kinds:
            raise ValueError(f"roots.{name}: unknown field {key!r}")
        _typed(value, kinds[key], f"roots.{name}.{key}")
    root = RootInfo(**fields)
    root.installed = float(root.installed)
    if root.verdict not in _VERDICTS:
        raise ValueError(f"roots.{name}.verdict: {root.verdict!r}")
    return root


def _log_entry(entry: Any) -> dict[str, Any]:
    """A log entry: an object whose fields the commands read (``event``, ``slot``, ``root``:
    which root was made the default, for a rollback's choice) are strings when present
    (a list there was an internal error of ``rollback`` and ``mark-bad``)."""
    _typed(entry, dict, "log entry")
    for key in ("event", "slot", "root"):
        if key in entry:
            _typed(entry[key], str, f"log entry's {key}")
    return dict(entry)


def _parse(doc: Any) -> DeviceState:
    """The state from a decoded document: every field of its type (a damaged file is
    refused here, never found out by a command halfway through its steps)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a btrdelta device state file")
    if doc.get("version") != VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r}")
    roots = {}
    for name, info in _typed(doc.get("roots", {}), dict, "roots").items():
        if name not in BOOTABLE:
            raise ValueError(f"unknown root {name!r}")
        roots[name] = _root_info(name, info)
    state = []
    for i, s in enumerate(_typed(doc.get("state", []), list, "state")):
        sub = _typed(s, dict, f"state[{i}]")
        for key, value in sub.items():
            if key not in ("name", "path", "mode"):
                raise ValueError(f"state[{i}]: unknown field {key!r}")
            _typed(value, str, f"state[{i}].{key}")
        state.append(StateSubvol(**sub))
    pending = doc.get("pending")
    if pending is not None:
        _typed(pending, dict, "pending")
    st = DeviceState(
        tries=_typed(doc["tries"], int, "tries"),
        hook=doc.get("hook") if doc.get("hook") is None else _typed(doc["hook"], str, "hook"),
        state=state,
        roots=roots,
        pending=pending,
        generation=_typed(doc.get("generation", 0), int, "generation"),
        log=[_log_entry(e) for e in _typed(doc.get("log", []), list, "log")],
    )
    if st.tries < 1:
        raise ValueError(f"tries: {st.tries}")
    for s in st.state:
        parse_state_spec(f"{s.name}:{s.path}:{s.mode}")
    return st


def load_state(layout: Layout) -> DeviceState:
    """Read the state file.

    Raises:
        DeviceError: the filesystem was not initialized.
        StreamFormatError: the state file is damaged (names the file and what is wrong).
    """
    try:
        with open(layout.state_file, "rb") as f:
            raw = f.read(_MAX_SIZE + 1)
    except FileNotFoundError as exc:
        raise DeviceError(f"{layout.name}: not a btrdelta device (run `btrdelta device "
                          "init` first)") from exc
    try:
        if len(raw) > _MAX_SIZE:
            raise ValueError("too large")
        return _parse(json.loads(raw))
    except DeviceError as exc:  # (a state subvolume's spec: parse_state_spec)
        raise StreamFormatError(f"invalid device state file: {exc}",
                                source=str(layout.state_file)) from exc
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StreamFormatError(f"invalid device state file: {exc}",
                                source=str(layout.state_file)) from exc


def mounts_text(st: DeviceState) -> str:
    """The ``mounts`` file: one ``MODE NAME PATH`` line per state subvolume."""
    lines = ["# btrdelta device mounts (generated from state.json): MODE NAME PATH"]
    lines += [f"{s.mode} {s.name} {s.path}" for s in st.state]
    return "\n".join(lines) + "\n"


def save_state(layout: Layout, st: DeviceState) -> None:
    """Write the state file (and the mounts file when it changed), atomically."""
    st.generation += 1
    data = json.dumps(st.to_json(), indent=1, sort_keys=False).encode() + b"\n"
    write_atomic(layout.state_file, data)
    text = mounts_text(st).encode()
    try:
        same = layout.mounts_file.read_bytes() == text
    except FileNotFoundError:
        same = False
    if not same:
        write_atomic(layout.mounts_file, text)
