"""Optional dependencies (``btrdelta._optional``): the core never imports one at import time,
pyproject.toml's extras are the ones the code names, and a command that needs a missing one
fails in one line with exit 10 naming the extra to install (the optional modules are made
unimportable in a child process by a ``sitecustomize`` shim). ``scripts/install_sizes.py``
(``make sizes``) checks the same on real installs of each profile."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from btrdelta._optional import EXTRAS, OPTIONAL
from btrdelta.errors import MissingDependencyError
from btrdelta.testing.tarballs import extract_tar
from tests.conftest import DATA, committed_streams

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "btrdelta"
FULL = next(s for s in committed_streams() if ".A." in s.name)
#: modules that exist to wrap one optional dependency: they may import it at module level,
#: and every import of them must be inside a function
WRAPPERS = {"btrdelta.chunk.fuse": "mfusepy"}


def _module(path: Path) -> str:
    parts = ["btrdelta", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_nodes(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements that run when the module is imported (function bodies do not; class
    bodies and ``if``/``try``/``with`` blocks do; ``if TYPE_CHECKING:`` blocks do not)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += _import_time_nodes(node.orelse)
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                out += _import_time_nodes([n for n in inner if isinstance(n, ast.stmt)] + [
                    s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])
    return out


def eager_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """``line: what`` for each import of an optional dependency (or of a wrapper module)
    that ``module`` runs at import time."""
    found = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in _import_time_nodes(ast.parse(source).body):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [target, *(f"{target}.{a.name}" for a in node.names)]
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL and WRAPPERS.get(module) != top:
                found.append(f"{node.lineno}: {name} (use btrdelta._optional.need)")
            if name in WRAPPERS and module != name:
                found.append(f"{node.lineno}: {name} wraps {WRAPPERS[name]} (import it late)")
    return found


def test_no_module_imports_an_optional_dependency_at_import_time() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        where = _module(path)
        found += [f"{where}:{line}" for line in
                  eager_imports(path.read_text(), where, path.name == "__init__.py")]
    assert found == []


@pytest.mark.parametrize(("source", "module"), [
    ("import xxhash\n", "btrdelta.send.scan"),
    ("from pyfastcdc.cy import FastCDC\n", "btrdelta.chunk.chunker"),
    ("try:\n    import hdiffpatch\nexcept ImportError:\n    pass\n", "btrdelta.delta.x"),
    ("class A:\n    import mfusepy\n", "btrdelta.chunk.store"),
    ("from .fuse import mount_image\n", "btrdelta.chunk.nbd"),
    ("from ..chunk import fuse\n", "btrdelta.cli.image_cmd"),
])
def test_the_check_finds_eager_imports(source: str, module: str) -> None:
    assert eager_imports(source, module)


@pytest.mark.parametrize(("source", "module"), [
    ("def f():\n    import xxhash\n", "btrdelta.send.scan"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyfastcdc.cy import "
     "FastCDC\n", "btrdelta.chunk.chunker"),
    ("import mfusepy\n", "btrdelta.chunk.fuse"),
])
def test_the_check_lets_lazy_imports_pass(source: str, module: str) -> None:
    assert eager_imports(source, module) == []


def _names(reqs: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}


def test_pyproject_extras_are_the_ones_the_code_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & set(OPTIONAL)
    for extra, dists in EXTRAS.items():
        assert _names(extras[extra]) == set(dists), extra
    assert _names(extras["all"]) == set(OPTIONAL)
    assert "typing-extensions" not in _names(project["dependencies"])


def test_the_message_names_the_extra() -> None:
    err = MissingDependencyError("pyfastcdc", "image")
    assert str(err) == "needs the optional dependency pyfastcdc: pip install 'btrdelta[image]'"
    assert err.exit_code == 10


#: makes the modules named in $BTRDELTA_TEST_BLOCK unimportable (as if not installed)
_SHIM = """import sys
_BLOCK = set(__import__("os").environ["BTRDELTA_TEST_BLOCK"].split(","))
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Blocker())
#: and those in $BTRDELTA_TEST_SLOW take 0.5 s more to import (threads meet it unfinished)
_SLOW = set(filter(None, __import__("os").environ.get("BTRDELTA_TEST_SLOW", "").split(",")))
class _Slow:
    def find_spec(self, name, path=None, target=None):
        if name not in _SLOW:
            return None
        spec = next(filter(None, (f.find_spec(name, path, target) for f in sys.meta_path
                                  if f is not self and hasattr(f, "find_spec"))), None)
        if spec is None:
            return None
        loader = spec.loader
        class Slow:
            def create_module(self, spec):
                return loader.create_module(spec)
            def exec_module(self, module):
                __import__("time").sleep(0.5)
                loader.exec_module(module)
        spec.loader = Slow()
        return spec
sys.meta_path.insert(0, _Slow())
"""


Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def without(tmp_path: Path) -> Callable[..., Runner]:
    """``without(*names)(*args)``: run ``python -m btrdelta ARGS`` with ``names`` blocked
    (``slow``: these modules' imports 0.5 s slower)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SHIM)

    def run(*blocked: str, slow: str = "") -> Runner:
        env = {**os.environ, "BTRDELTA_TEST_BLOCK": ",".join(blocked),
               "BTRDELTA_TEST_SLOW": slow,
               "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}

        def cli(*args: object, code: str | None = None) -> subprocess.CompletedProcess[str]:
            argv = ["-c", code] if code else ["-m", "btrdelta", *map(str, args)]
            return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                                  env=env, check=False, cwd=tmp_path, timeout=120)
        return cli
    return run


def test_the_shim_blocks(without: Callable[..., Runner]) -> None:
    proc = without("xxhash")(code="import xxhash")
    assert "ModuleNotFoundError" in proc.stderr


def test_core_imports_and_receives_without_any_optional_dependency(
        without: Callable[..., Runner], tmp_path: Path) -> None:
    cli = without(*OPTIONAL)
    modules = sorted(_module(p) for p in SRC.rglob("*.py") if _module(p) not in WRAPPERS
                     and "testing" not in p.parts and p.name != "__main__.py")
    proc = cli(code=f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
                    "import sys\nprint(sorted(set(sys.modules) & " + repr(set(OPTIONAL)) + "))")
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr
    for words in (["--help"], ["receive", "--help"], ["image", "clone", "--help"]):
        assert cli(*words).returncode == 0, words
    for blocked, dest in ((cli, tmp_path / "core"), (without(), tmp_path / "all")):
        dest.mkdir()
        proc = blocked("receive", "-q", "-f", FULL, dest)
        assert proc.returncode == 0, proc.stderr
    subvol = FULL.name.split(".")[0] + "-A"
    sums = [without()("tree-sum", d / subvol).stdout.split()[:1] for d in (tmp_path / "core",
                                                                tmp_path / "all")]
    assert sums[0]
    assert sums[0] == sums[1]


def _one_line(proc: subprocess.CompletedProcess[str], command: str, what: str) -> None:
    """Exit 10 and one line: ``btrdelta COMMAND: error: [where: ]WHAT``."""
    assert proc.returncode == 10, proc.stderr
    assert proc.stderr.startswith(f"btrdelta {command}: error: "), proc.stderr
    assert proc.stderr.endswith(f"{what}\n"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_missing_extras_are_one_line_with_exit_10(without: Callable[..., Runner],
                                                  tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 16))
    proc = without("pyfastcdc")("image", "compress", "-i", img, "-o", tmp_path / "a.bdar")
    _one_line(proc, "image compress",
              "needs the optional dependency pyfastcdc: pip install 'btrdelta[image]'")
    assert not (tmp_path / "a.bdar").exists()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 10000)
    proc = without("xxhash")("send", tree, "-f", tmp_path / "s.stream")
    _one_line(proc, "send", "needs the optional dependency xxhash: pip install 'btrdelta[make]'")
    assert not (tmp_path / "s.stream").exists()
    proc = without("pyfastcdc")("delta", "make", "-f", FULL, "--old", tree, "-o",
                                tmp_path / "d")
    _one_line(proc, "delta make",
              "needs the optional dependency pyfastcdc: pip install 'btrdelta[make]'")
    proc = without("mfusepy")("image", "mount", tmp_path / "store/x", tmp_path)
    _one_line(proc, "image mount",
              "needs the optional dependency mfusepy: pip install 'btrdelta[fuse]'")


def test_an_hdiff_delta_needs_the_hdiff_extra(without: Callable[..., Runner],
                                              tmp_path: Path) -> None:
    """A committed delta made of HDiffPatch patches: refused without hdiffpatch (nothing
    written), expanded to the SHA-256 its MANIFEST.json records with it."""
    manifest = json.loads((DATA / "deltas" / "MANIFEST.json").read_text())
    entry = manifest["deltas"][0]
    assert "hdiff" in entry["files_by_codec"]
    old = tmp_path / "old"
    extract_tar(DATA / "deltas" / manifest["old"], old)
    args = ("delta", "expand", "-q", "-f", DATA / "deltas" / entry["file"], "--old", old,
            "-o", tmp_path / "x.stream")
    proc = without("hdiffpatch")(*args)
    _one_line(proc, "delta expand", "codec 'hdiff-raw' needs the optional dependency "
                                    "hdiffpatch: pip install 'btrdelta[hdiff]'")
    assert f"{entry['file']}: record " in proc.stderr  # where: the delta and the record
    assert not (tmp_path / "x.stream").exists()
    assert without()(*args).returncode == 0
    assert hashlib.sha256((tmp_path / "x.stream").read_bytes()).hexdigest() == \
        entry["expanded"]["sha256"]


def test_a_full_record_send_needs_no_fastcdc(without: Callable[..., Runner],
                                             tmp_path: Path) -> None:
    """A full send clones no ranges of old files: it neither imports pyfastcdc (~16 ms of a
    replication's start, before its first record) nor needs it."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(50_000))
    proc = without("pyfastcdc")("send", tree, "-o", tmp_path / "s", "--record", "--store",
                                tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s").stat().st_size > 50_000


def test_an_optional_dependency_first_imported_by_threads_at_once(
        without: Callable[..., Runner], tmp_path: Path) -> None:
    """A send's hashing threads each ask for xxhash on their first file: a thread that
    found it in sys.modules while another was still importing it (the import made slow
    here) used it unfinished, and `send --parent` of plain directories failed ('internal
    error: AttributeError: partially initialized module 'xxhash' has no attribute
    'xxh3_128'': 3 of 12 fresh runs before, without any shim). Oracle: the stream of a run
    whose import is not slowed, byte for byte."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for i in range(4):
        (old / f"f{i}").write_bytes(os.urandom(300_000))
        (new / f"f{i}").write_bytes(os.urandom(300_000))
        (new / f"n{i}").write_bytes(os.urandom(4 << 20))  # (hashed by the threads)
    slow = without(slow="xxhash")("send", "--parent", old, new, "-o", tmp_path / "s1", "-q")
    assert (slow.returncode, slow.stderr) == (0, ""), slow.stderr
    plain = without()("send", "--parent", old, new, "-o", tmp_path / "s2", "-q")
    assert (plain.returncode, plain.stderr) == (0, ""), plain.stderr
    assert (tmp_path / "s1").read_bytes() == (tmp_path / "s2").read_bytes()
