"""The floors of ``docs/architecture.md``, held by a test (as dulwich's ``test_source.py``).

Every import in ``src/btrdelta`` (module level or inside a function: a lazy import is still
a dependency) is resolved and checked against:

- the floors: a package imports only packages on floors below its own (plus the few
  same-floor edges listed in ``SAME_FLOOR``);
- the "knows nothing of" column: forbidden packages and standard modules per package
  (the formats and protocols stay sans-I/O);
- who may parse arguments (``argparse``: only ``cli``) and read the environment
  (``os.environ``/``os.getenv``: only ``cli``, the backend switch ``_native`` and the proxy
  variables' reader ``transport.proxy``).

And the rooms stay small: no module over 800 lines, no function over 80.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "btrdelta"

FLOORS: dict[str, int] = {
    "errors": 0, "trust": 0, "_native": 0, "_value": 0, "_optional": 0, "_malloc": 0,
    "_defaults": 0, "_zstd": 0, "_pool": 0, "_futures": 0, "_pathlib": 0,
    "stream": 1, "tree": 1, "fs": 1, "transport": 1,
    "send": 2, "delta": 2, "receive": 2, "chunk": 2,
    "repo": 3, "protocol": 3,
    "update": 4,
    "device": 5,
    "cli": 6, "__main__": 7,
    # helpers for tests, the demo and benchmarks: above everything, imported by nothing
    "testing": 7,
}
#: same-floor imports that are part of the design: the tree model follows stream records and
#: reads files through the filesystem floor (floor 0 is a toolbox: its modules share freely)
SAME_FLOOR = {("tree", "stream"), ("tree", "fs")}
#: package -> what it must know nothing of (btrdelta packages or standard modules)
FORBIDDEN: dict[str, set[str]] = {
    "stream": {"os", "socket", "ssl", "subprocess", "httpx", "http", "urllib"},
    "protocol": {"socket", "ssl", "subprocess", "asyncio", "selectors", "httpx"},
    "repo": {"receive", "delta", "send"},  # fulls are chunk archives: it reads that format
    "delta": {"receive"},
    "receive": {"delta"},
    "chunk": {"stream"},
    "transport": {"chunk"},
    "fs": {"stream"},
    "tree": {"send", "delta", "receive", "chunk"},
}
#: who may read the environment (``_zstd``: zstandard's own import policy, as ``import
#: zstandard`` reads it); who may parse arguments
ENV_READERS = {"cli", "_native", "_zstd", "testing"}
#: single modules that may: the proxy variables (``https_proxy``...) are the HTTP client's
#: settings wherever it is used (the CLI, device backups, the API), as every HTTP client
#: reads them (curl, urllib, httpx until session 26)
ENV_MODULES = {"btrdelta.transport.proxy"}
ARGPARSE_USERS = {"cli"}


def _package(module: str) -> str:
    """``btrdelta.delta.make`` -> ``delta``; ``btrdelta`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``tree``."""
    out: list[tuple[int, str]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            if node.module is None or target == "btrdelta":  # from . import x: x is a module
                out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def _reads_environment(tree: ast.AST) -> int | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "environb", "getenv"} \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            return node.lineno
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in {"environ", "environb", "getenv"} for a in node.names):
            return node.lineno
    return None


def violations(src: Path) -> list[str]:
    """Every breach of the rules above in the package at ``src``."""
    found: list[str] = []
    for path in sorted(src.rglob("*.py")):
        module = _module_name(path, src)
        pkg = _package(module)
        where = f"{path.relative_to(src.parent)}"
        tree = ast.parse(path.read_text(), str(path))
        if pkg == "":  # the top-level facade: floor 0 at import time, the API lazily
            found += [f"{where}:{node.lineno}: the package facade imports {node.module} at "
                      "import time (make it lazy)" for node in tree.body
                      if isinstance(node, ast.ImportFrom) and node.level and node.module
                      and FLOORS.get(node.module.split(".")[0], 9) > 0]
            continue
        if pkg not in FLOORS:
            found.append(f"{where}: package {pkg!r} has no floor (add it to the design)")
            continue
        floor = FLOORS[pkg]
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top in FORBIDDEN.get(pkg, ()):
                found.append(f"{where}:{line}: {pkg} must know nothing of {top}")
            if top == "argparse" and pkg not in ARGPARSE_USERS:
                found.append(f"{where}:{line}: only cli parses arguments (argparse)")
            if top != "btrdelta":
                continue
            other = _package(target)
            if other in ("", pkg) or other not in FLOORS:
                continue
            if other in FORBIDDEN.get(pkg, ()):
                found.append(f"{where}:{line}: {pkg} must know nothing of {other}")
            elif FLOORS[other] > floor or (FLOORS[other] == floor != 0
                                            and (pkg, other) not in SAME_FLOOR):
                found.append(f"{where}:{line}: {pkg} (floor {floor}) imports {other} "
                             f"(floor {FLOORS[other]})")
        line_env = _reads_environment(tree)
        if line_env is not None and pkg not in ENV_READERS and module not in ENV_MODULES:
            found.append(f"{where}:{line_env}: only cli and _native read the environment")
    return found


def test_the_floors_hold() -> None:
    assert violations(SRC) == []


@pytest.mark.parametrize(("module", "code", "expect"), [
    ("stream/_bad.py", "from ..receive import receive\n", "stream (floor 1) imports receive"),
    ("delta/_bad.py", "def f():\n    from ..receive import find_parent\n",
     "delta must know nothing of receive"),
    ("receive/_bad.py", "from btrdelta import delta\n", "receive must know nothing of delta"),
    ("chunk/_bad.py", "from ..stream import constants\n", "chunk must know nothing of stream"),
    ("transport/_bad.py", "import btrdelta.chunk.store\n", "transport must know nothing"),
    ("fs/_bad.py", "import argparse\n", "only cli parses arguments"),
    ("send/_bad.py", "import os\nx = os.environ.get('X')\n", "only cli and _native read"),
    ("stream/_bad.py", "import subprocess\n", "stream must know nothing of subprocess"),
    ("delta/_bad.py", "from ..update import receive\n", "delta (floor 2) imports update"),
    ("__init__.py", "from .update.receive import receive_any\n", "make it lazy"),
])
def test_a_violation_is_caught(tmp_path: Path, module: str, code: str, expect: str) -> None:
    fake = tmp_path / "btrdelta"
    for pkg in ("stream", "delta", "receive", "chunk", "transport", "fs", "send", "update"):
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("from .errors import BtrdeltaError\n")
    assert violations(fake) == []
    (fake / module).write_text(code)
    found = violations(fake)
    assert len(found) == 1
    assert expect in found[0]


def crowded(src: Path, max_module: int = 800, max_function: int = 80) -> list[str]:
    """Modules over ``max_module`` lines, functions over ``max_function`` lines; the lines
    of a generated section (``_value.py``'s shapes, between ``# --- generated by`` and
    ``# --- end of generated code``) are not counted: a script writes them, nobody reads
    them as the module."""
    found: list[str] = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(src.parent)
        written = re.sub(r"\n# --- generated by .*?\n# --- end of generated code[^\n]*", "",
                         text, flags=re.S)
        if written.count("\n") > max_module:
            found.append(f"{where}: {written.count(chr(10))} lines (split the room)")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > max_function:
                    found.append(f"{where}:{node.lineno}: {node.name} is {length} lines")
    return found


def test_no_crowded_rooms() -> None:
    assert crowded(SRC) == []


def test_a_crowded_room_is_caught(tmp_path: Path) -> None:
    (tmp_path / "btrdelta").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    (tmp_path / "btrdelta" / "m.py").write_text(f"def f():\n{body}")
    assert crowded(tmp_path / "btrdelta") == ["btrdelta/m.py:1: f is 81 lines"]
    lines = "".join(f"x{i} = {i}\n" for i in range(790))
    shapes = "".join(f"y{i} = {i}\n" for i in range(100))
    (tmp_path / "btrdelta" / "m.py").write_text(
        f"{lines}# --- generated by a script\n{shapes}# --- end of generated code ---\n")
    assert crowded(tmp_path / "btrdelta") == []  # (the generated lines are not counted)
    (tmp_path / "btrdelta" / "m.py").write_text(lines + shapes)
    assert crowded(tmp_path / "btrdelta") == ["btrdelta/m.py: 890 lines (split the room)"]


def test_thread_pools_come_from_futures() -> None:
    """Every thread pool of the package is ``btrdelta._futures.ThreadPoolExecutor``, whose
    ``submit`` a Ctrl-C cannot cut while it holds a lock its workers need (concurrent.futures'
    own pool hung ``image clone`` so). ``concurrent.futures`` may still give ``Future``."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_futures.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = (isinstance(node, ast.ImportFrom) and node.module == "concurrent.futures"
                        and any(a.name == "ThreadPoolExecutor" for a in node.names))
            named = (isinstance(node, ast.Attribute) and node.attr == "ThreadPoolExecutor"
                     and isinstance(node.value, ast.Name) and node.value.id == "futures")
            if imported or named:
                wrong.append(f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}")
    assert wrong == []
