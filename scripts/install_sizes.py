"""Build the sdist and the wheel, install each install profile into a fresh venv, and print
what each one weighs on disk; then use the core install as a device would.

Run by ``make sizes`` (needs the package index the machine's pip uses; not part of
``make test``). Steps:

1. ``python -m build`` makes the sdist, then the wheel *from the sdist* (so the sdist is
   complete enough to build); the sdist must carry README, LICENSE, docs/, share/ (man
   pages, completions), tests/ and the C sources.
2. For each profile (core, ``[make]``, ``[hdiff]``, ``[image]``, ``[fuse]``, ``[all]``):
   a venv made with ``--without-pip``, the wheel installed into it by this interpreter's pip
   (``pip --python``); the size is ``du`` of the venv minus that of an empty venv, and the
   distributions it holds are listed with theirs.
3. Smoke test of the core venv as a device uses it: ``btrdelta receive`` of committed
   kernel-made streams (a full one, then its incremental), whose ``tree-sum`` must equal
   that of what the development venv receives; a committed delta made of HDiffPatch patches
   is refused in one line with exit 10 naming ``btrdelta[hdiff]`` (and in the ``[hdiff]``
   venv expands to the SHA-256 its MANIFEST.json records); ``btrdelta send`` is refused in
   one line with exit 10 naming ``btrdelta[make]``.

Exit status 0 when every check passed, 1 otherwise. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from btrdelta.testing.tarballs import extract_tar

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PROFILES = {"core": "", "make": "[make]", "hdiff": "[hdiff]", "image": "[image]",
            "fuse": "[fuse]", "all": "[all]"}
#: what the sdist must carry (prefixes below its top directory)
SDIST_MUST = ["README.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in", "Makefile",
              "src/btrdelta/_constants.h", "src/btrdelta/stream/_speedups.c",
              "docs/cli-json.md", "docs/formats/", "share/man/man1/btrdelta.1",
              "share/bash-completion/completions/btrdelta", "share/zsh/site-functions/_btrdelta",
              "tests/conftest.py", "tests/data/streams/", "scripts/gen_cli_files.py"]


def _run(*cmd: object, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]


def _du(path: Path) -> int:
    """Bytes of the files below ``path`` (apparent sizes, hard links once)."""
    return int(_run("du", "-sb", path).stdout.split()[0])


def build(out: Path) -> tuple[Path, Path, list[str]]:
    """(sdist, wheel, what the sdist lacks of :data:`SDIST_MUST`)."""
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    sdist = next(out.glob("btrdelta-*.tar.gz"))
    wheel = next(out.glob("btrdelta-*.whl"))
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    lacks = [m for m in SDIST_MUST if not any(n == m or n.startswith(m) for n in names)]
    return sdist, wheel, lacks


def install(wheel: Path, venvs: Path, name: str, extra: str) -> tuple[Path, int, dict[str, int]]:
    """A fresh venv with ``wheel`` + ``extra``: (venv, bytes added, bytes per distribution)."""
    venv = venvs / name
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    empty = _du(venv)
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-cache-dir", f"{wheel}{extra}")
    report = _run(venv / "bin" / "python", "-c", _PER_DIST).stdout
    return venv, _du(venv) - empty, json.loads(report)


#: bytes per installed distribution, from each one's RECORD
_PER_DIST = """
import importlib.metadata as md, json, os
out = {}
for d in md.distributions():
    n = 0
    for f in d.files or []:
        try:
            n += os.path.getsize(f.locate())
        except OSError:
            pass
    out[d.metadata["Name"]] = n
print(json.dumps(out))
"""


def _cli(venv: Path, *args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return _run(venv / "bin" / "btrdelta", *args, check=False, **kw)


def _one_line_exit_10(proc: subprocess.CompletedProcess[str], extra: str) -> str | None:
    """``None`` if ``proc`` failed the way a missing extra must, else what is wrong."""
    lines = proc.stderr.splitlines()
    if proc.returncode != 10 or len(lines) != 1 or f"pip install 'btrdelta[{extra}]'" \
            not in lines[0] or "Traceback" in proc.stderr:
        return f"exit {proc.returncode}, stderr {proc.stderr!r}"
    return None


def smoke(venvs: dict[str, Path], work: Path) -> list[str]:
    """The core venv used as a device would; returns what failed."""
    core, failures = venvs["core"], []
    dev_btrdelta = Path(sys.executable).parent / "btrdelta"
    for stream in ("dir-rotation-083.A.v2.stream", "dir-rotation-083.B.v2.stream"):
        for who, exe in (("core", core / "bin" / "btrdelta"), ("dev", dev_btrdelta)):
            dest = work / f"recv-{who}"
            dest.mkdir(exist_ok=True)
            proc = _run(exe, "receive", "-q", "-f", DATA / "streams" / stream, dest,
                        check=False)
            if proc.returncode:
                failures.append(f"{who} receive {stream}: {proc.stderr.strip()}")
    sums = [_cli(core, "tree-sum", work / f"recv-{w}" / "dir-rotation-083-B").stdout[:64]
            for w in ("core", "dev")]
    if not sums[0] or sums[0] != sums[1]:
        failures.append(f"core receive: tree-sum {sums[0]!r} != dev venv's {sums[1]!r}")
    manifest = json.loads((DATA / "deltas" / "MANIFEST.json").read_text())
    old = work / "old"
    extract_tar(DATA / "deltas" / manifest["old"], old)
    entry = manifest["deltas"][0]
    delta = DATA / "deltas" / entry["file"]
    bad = _one_line_exit_10(_cli(core, "delta", "expand", "-f", delta, "--old", old, "-o",
                                 work / "x.stream"), "hdiff")
    if bad:
        failures.append(f"core delta expand of an hdiff delta: {bad}")
    proc = _cli(venvs["hdiff"], "delta", "expand", "-q", "-f", delta, "--old", old, "-o",
                work / "x.stream")
    digest = hashlib.sha256((work / "x.stream").read_bytes()).hexdigest() \
        if proc.returncode == 0 else proc.stderr
    if digest != entry["expanded"]["sha256"]:
        failures.append(f"[hdiff] delta expand: {digest} != {entry['expanded']['sha256']}")
    bad = _one_line_exit_10(_cli(core, "send", old, "-f", work / "s.stream"), "make")
    if bad:
        failures.append(f"core send: {bad}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="btrdelta-sizes.") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sdist, wheel, lacks = build(work / "dist")
        print(f"sdist {sdist.name}: {sdist.stat().st_size / 1e6:.2f} MB; "
              f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB")
        failures = [f"sdist lacks {m}" for m in lacks]
        venvs: dict[str, Path] = {}
        figures: dict[str, object] = {}
        for name, extra in PROFILES.items():
            venv, size, dists = install(wheel, work / "venvs", name, extra)
            venvs[name] = venv
            figures[name] = {"bytes": size, "distributions": dists}
            print(f"{name:>6} btrdelta{extra:<8} {size / 1e6:6.1f} MB installed "
                  f"({len(dists)} distributions)")
        core = figures["core"]["distributions"]  # type: ignore[index]
        print("core, per distribution: " + ", ".join(
            f"{n} {b / 1e6:.1f}" for n, b in sorted(core.items(), key=lambda i: -i[1])))
        failures += smoke(venvs, work)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        for f in failures:
            print(f"FAIL: {f}", file=sys.stderr)
        print("smoke test of the core install: " + ("FAILED" if failures else "ok"))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
