"""Applying send streams to a directory or a real btrfs subvolume (``btrdelta receive``).

``receive(events, dest)`` takes any iterator of stream events (from
:class:`btrdelta.stream.StreamReader` or a later stage) and returns the subvolumes it
finished. Modules: :mod:`.receiver` (the receive loop), :mod:`.applier` (one method per
command), :mod:`.subvolumes` (the lifecycle of a subvolume: begin, finish with a pre-commit
hook, abort; parent lookups; usable without an applier), :mod:`.encoded` (decompressing
ENCODED_WRITE), :mod:`.registry` (uuid -> directory on non-btrfs destinations). Paths,
ioctls and copies are :mod:`btrdelta.fs`'s.
"""

from __future__ import annotations

from .. import TYPE_CHECKING, _pathlib  # noqa: F401  (first: ``pathlib`` without ``re``...)
from .applier import Applier
from .receiver import receive
from .subvolumes import (
    PendingSubvol,
    PreCommit,
    ReceivedSubvol,
    Subvolumes,
    find_parent,
    find_subvolume,
    uses_btrfs,
)

if TYPE_CHECKING:
    from typing import Any

    from .registry import REGISTRY_NAME, Registry

__all__ = [
    "REGISTRY_NAME",
    "Applier",
    "PendingSubvol",
    "PreCommit",
    "ReceivedSubvol",
    "Registry",
    "Subvolumes",
    "find_parent",
    "find_subvolume",
    "receive",
    "uses_btrfs",
]


def __getattr__(name: str) -> Any:
    # the registry (json) serves only destinations that are not btrfs: imported on first use
    if name in ("REGISTRY_NAME", "Registry"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
