"""Add the format-6 fixtures to tests/data/deltas (formats 4 and 5's are never touched).

Format 6 is format 5 with the ``xz`` carrier whose pieces go through the x86 branch
converter before raw LZMA2 (carrier codec 3).
Run once: ``.venv/bin/python tests/data/make_deltas_v6.py``. It expands the committed
format-4 deltas of the kernel's release streams against the committed old tree (checking
each against MANIFEST.json's SHA-256), makes format-6 deltas of those streams with today's
``delta make --carrier xz`` and appends their entries (``"format": 6``) to MANIFEST.json.
Like format 4's, these files are frozen once committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

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
            name = entry["file"].removesuffix(".delta") + ".xz6.delta"
            if name in have:
                continue
            back = io.BytesIO()
            with open(OUT / entry["file"], "rb") as f:
                expand_to(open_delta(f), old, back.write)
            stream = back.getvalue()
            assert hashlib.sha256(stream).hexdigest() == entry["expanded"]["sha256"]
            out: list[bytes] = []
            stats = make_delta(io.BufferedReader(io.BytesIO(stream)), old,  # type: ignore[arg-type]
                               out.append, MakeOptions(jobs=1, carrier="xz"))
            (OUT / name).write_bytes(b"".join(bytes(p) for p in out))
            manifest["deltas"].append({
                **{k: entry[k] for k in ("stream_proto", "compressed_data", "level",
                                         "expanded")},
                "file": name, "format": 6, "carrier": "xz",
                "patched_files": stats.patched_files,
                "files_by_codec": dict(sorted(stats.files_by_codec.items())),
            })
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
