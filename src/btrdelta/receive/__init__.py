"""Applying send streams to a directory or a real btrfs subvolume (``btrdelta receive``).

``receive(events, dest)`` takes any iterator of stream events (from
:class:`btrdelta.stream.StreamReader` or a later stage) and returns the subvolumes it
finished. Modules: :mod:`.applier` (one method per command), :mod:`.sandbox` (safe path
resolution), :mod:`.subvol` (btrfs and file ioctls), :mod:`.encoded` (decompressing
ENCODED_WRITE), :mod:`.registry` (uuid -> directory on non-btrfs destinations).
"""

from __future__ import annotations

from .applier import Applier, ReceivedSubvol, find_parent, find_subvolume
from .receiver import receive
from .registry import REGISTRY_NAME, Registry

__all__ = [
    "REGISTRY_NAME",
    "Applier",
    "ReceivedSubvol",
    "Registry",
    "find_parent",
    "find_subvolume",
    "receive",
]
