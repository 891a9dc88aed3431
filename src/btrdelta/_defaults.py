"""Default locations, importable without the modules that use them.

``btrdelta replicate --serve`` names the sendshot store's default in its ``--help`` but
receives only: importing :mod:`btrdelta.send.store` for the name would load the send side
(scan, hashing, the record format: ~15 ms of a receiver's start, which a local replication
waits for before its first byte).
"""

from __future__ import annotations

__all__ = ["DEFAULT_STORE"]

#: where sendshot records live unless ``--store`` says otherwise
DEFAULT_STORE = "/var/lib/btrdelta/sendshots"
