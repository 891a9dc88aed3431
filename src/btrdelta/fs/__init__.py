"""Filesystem primitives below the engines (floor 1).

Modules: :mod:`.sandbox` (the one safe walk of untrusted paths: ``openat``, no symlink
followed, no ``..``), :mod:`.btrfs` (btrfs ioctls and subvolume operations, the default
subvolume, UUID-tree lookups, FILEATTR <-> ``FS_*_FL`` flags both ways), :mod:`.content`
(a file's data segments), :mod:`.copy` (copies that keep holes, tree copies),
:mod:`.remove` (deleting a tree of any depth without recursion), :mod:`.longpath` (paths
longer than PATH_MAX, named through a directory's descriptor).

Knows nothing of streams or formats; ``receive``, ``send``, ``delta``, ``tree`` and the
workflows above them share it.
"""

from __future__ import annotations

__all__: list[str] = []
