"""Add the format-10 fixtures to tests/data/deltas (formats 4 to 9's are never touched).

Format 10 is format 9 whose short ``edits`` / ``edits2`` CPATCH may carry its new content's
4-byte digest instead of the old file's (flag 128), which ``delta make`` writes where the
new content goes out as regenerated compressed extents (the ``--compressed-data``
streams' ``v2c`` deltas); either carrier. Run once: ``.venv/bin/python
tests/data/make_deltas_v10.py``. It expands the committed format-4 deltas of the kernel's
release streams against the committed old tree (checking each against MANIFEST.json's
SHA-256), makes format-10 deltas of those streams with today's ``delta make --carrier
zstd`` and ``--carrier xz`` and appends their entries (``"format": 10``) to MANIFEST.json.
Like format 4's, these files are frozen once committed.
"""

from __future__ import annotations

from make_deltas_v8 import main  # (run as a script: its directory is on sys.path)

if __name__ == "__main__":
    main(10)
