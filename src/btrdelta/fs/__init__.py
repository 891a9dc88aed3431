"""Filesystem primitives below the engines (floor 1): the one safe path walk, btrfs ioctls
and subvolume operations, FILEATTR flags both ways, copies and holes.

Knows nothing of streams or formats; ``receive``, ``send``, ``delta`` and the workflows
above them share it.
"""

from __future__ import annotations

__all__: list[str] = []
