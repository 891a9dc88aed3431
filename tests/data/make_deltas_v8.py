"""Add the format-8 fixtures to tests/data/deltas (formats 4 to 7's are never touched).

Format 8 is format 7 with one more patch codec, ``edits2`` (6: ``edits`` with one operation
code after each copy), its CPATCH form (flag 64), and carried creations whose inode number
is the previous one's + 1 written without it (marker 0xfffa); either carrier. Run once:
``.venv/bin/python tests/data/make_deltas_v8.py``. It expands the committed format-4 deltas
of the kernel's release streams against the committed old tree (checking each against
MANIFEST.json's SHA-256), makes format-8 deltas of those streams with today's ``delta make
--carrier zstd`` and ``--carrier xz`` and appends their entries (``"format": 8``) to
MANIFEST.json. Like format 4's, these files are frozen once committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.testing.tarballs import extract_tar

OUT = Path(__file__).parent / "deltas"


def main(fmt: int = 8) -> None:
    """Add the fixtures of format ``fmt``, what ``delta make`` writes today (format 9's
    script calls this one)."""
    manifest = json.loads((OUT / "MANIFEST.json").read_text())
    have = {e["file"] for e in manifest["deltas"]}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        extract_tar(OUT / manifest["old"], old)
        for entry in list(manifest["deltas"]):
            if entry.get("format", 4) != 4 or entry["level"] == 0:
                continue
            for carrier in ("zstd", "xz"):
                _add(manifest, have, entry, old, carrier, fmt)
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _add(manifest: dict[str, Any], have: set[str], entry: dict[str, Any], old: Path,
         carrier: str, fmt: int) -> None:
        name = entry["file"].removesuffix(".delta") + f".{carrier}{fmt}.delta"
        if name in have:
            return
        back = io.BytesIO()
        with open(OUT / entry["file"], "rb") as f:
            expand_to(open_delta(f), old, back.write)
        stream = back.getvalue()
        assert hashlib.sha256(stream).hexdigest() == entry["expanded"]["sha256"]
        out: list[bytes] = []
        stats = make_delta(io.BufferedReader(io.BytesIO(stream)), old,  # type: ignore[arg-type]
                           out.append, MakeOptions(jobs=1, carrier=carrier))
        (OUT / name).write_bytes(b"".join(bytes(p) for p in out))
        manifest["deltas"].append({
            **{k: entry[k] for k in ("stream_proto", "compressed_data", "level",
                                     "expanded")},
            "file": name, "format": fmt, "carrier": carrier,
            "patched_files": stats.patched_files,
            "files_by_codec": dict(sorted(stats.files_by_codec.items())),
        })


if __name__ == "__main__":
    main()
