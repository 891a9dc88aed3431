"""Device workflows (floor 5): A/B roots as btrfs subvolumes fed by send and delta streams,
boot counting, a read-only base with writable overlays, factory reset, backup and restore.

The on-disk layout and the state file are specified in ``docs/device.md`` (precise enough
for a bootloader or an initramfs to follow). Modules: :mod:`.layout` (names, opening the
filesystem, subvolume steps), :mod:`.state` (the state file), :mod:`.boot` (default
subvolume, boot-counting file, hook), :mod:`.roots` (receiving a release as a root),
:mod:`.control` (init, status, recovery, verdicts), :mod:`.install`.

Nothing here parses arguments or prints: that is ``btrdelta.cli.device_cmd``.
"""

from __future__ import annotations

from .control import init, mark_bad, mark_good, recover, rollback, status
from .install import InstallResult, install
from .layout import DeviceError, Layout, open_device

__all__ = [
    "DeviceError",
    "InstallResult",
    "Layout",
    "init",
    "install",
    "mark_bad",
    "mark_good",
    "open_device",
    "recover",
    "rollback",
    "status",
]
