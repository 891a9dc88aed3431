"""Add the format-9 fixtures to tests/data/deltas (formats 4 to 8's are never touched).

Format 9 is format 8 whose carried commands may name their path by its place in the old
snapshot's listings (marker 0xfff9: components up from the previous path, then indexes
down); either carrier. Run once: ``.venv/bin/python tests/data/make_deltas_v9.py``. It
expands the committed format-4 deltas of the kernel's release streams against the committed
old tree (checking each against MANIFEST.json's SHA-256), makes format-9 deltas of those
streams with today's ``delta make --carrier zstd`` and ``--carrier xz`` and appends their
entries (``"format": 9``) to MANIFEST.json. Like format 4's, these files are frozen once committed.
"""

from __future__ import annotations

from make_deltas_v8 import main  # (run as a script: its directory is on sys.path)

if __name__ == "__main__":
    main(9)
