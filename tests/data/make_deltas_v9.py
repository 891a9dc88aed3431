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

import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.testing.tarballs import extract_tar

OUT = Path(__file__).parent / "deltas"


def main() -> None:
    manifest = json.loads((OUT / "MANIFEST.json").read_text())
    have = {e["file"] for e in manifest["deltas"]}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        extract_tar(OUT / manifest["old"], old)
        for entry in list(manifest["deltas"]):
            if entry.get("format", 4) != 4 or entry["level"] == 0:
                continue
            for carrier in ("zstd", "xz"):
                _add(manifest, have, entry, old, carrier)
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _add(manifest: dict[str, Any], have: set[str], entry: dict[str, Any], old: Path,
         carrier: str) -> None:
        name = entry["file"].removesuffix(".delta") + f".{carrier}9.delta"
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
            "file": name, "format": 9, "carrier": carrier,
            "patched_files": stats.patched_files,
            "files_by_codec": dict(sorted(stats.files_by_codec.items())),
        })


if __name__ == "__main__":
    main()
