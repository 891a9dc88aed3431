"""The console entry (``python -m btrdelta``) exits quickly but loses no output."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from btrdelta.cli import COMMANDS, build_parser, main
from tests.cli.test_delta_cli import _setup

STREAM = Path(__file__).parents[1] / "data" / "streams" / "reflink-deep-paths-108.A.v1.stream"


def test_quick_exit_flushes_all_output(tmp_path: Path,
                                       capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["dump", "-f", str(STREAM)]) == 0
    want = capfdbinary.readouterr().out
    assert want.count(b"\n") > 10
    out = tmp_path / "dump.txt"  # a file: block-buffered, the case a lost flush would show
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", "dump", "-f", str(STREAM)],
                              stdout=f, stderr=subprocess.PIPE, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == want


def test_exit_code_and_error_line_survive_the_quick_exit(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "dump", "-f",
                           str(tmp_path / "missing")], capture_output=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("btrdelta dump: error:")


def test_the_console_entry_collects_young_garbage_rarely() -> None:
    """A command's process runs the cyclic collector every ``_GC_YOUNG`` allocations (its
    start-up objects are not gone over 700 allocations at a time, and those made before
    ``main`` are frozen out of every collection); a library caller keeps Python's setting."""
    import gc

    from btrdelta.cli import _GC_YOUNG

    code = ("import gc, btrdelta.cli as c\n"
            "c.main = lambda: print(gc.get_threshold()[0], gc.get_freeze_count() > 1000,"
            " gc.get_count()[0] < 100) or 0\n"
            "c.entry()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(_GC_YOUNG), "True", "True"]
    assert _GC_YOUNG >= 10_000
    assert gc.get_threshold()[0] < _GC_YOUNG  # importing btrdelta.cli changed nothing here
    # (as a bare interpreter: 0, but 375 on CPython 3.12.1, which starts with some frozen)
    bare = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
                          capture_output=True, text=True, check=True).stdout
    assert gc.get_freeze_count() == int(bare)
    main_py = (Path(__file__).parents[2] / "src" / "btrdelta" / "__main__.py").read_text()
    assert f"gc.set_threshold({_GC_YOUNG:_}," in main_py  # python -m btrdelta: the same
    # ... before the CLI's imports: the console script's module and the package import
    # nothing else (not even typing)
    code = ("import sys, btrdelta.__main__\n"
            "print(sorted(m for m in sys.modules if m.startswith(('btrdelta', 'typing'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['btrdelta', 'btrdelta.__main__']"
    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert scripts["project"]["scripts"]["btrdelta"] == "btrdelta.__main__:entry"


def test_listing_is_the_full_parsers_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--help`` lists the commands from COMMANDS without importing them: the same text as
    the parser with every command module's own parser registered."""
    monkeypatch.setenv("COLUMNS", "100")
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    assert build_parser(listing=True).format_help() == full.format_help()
    for name, (module, _line) in COMMANDS.items():
        alone = next(a for a in build_parser(name)._actions
                     if isinstance(a, argparse._SubParsersAction))
        assert list(alone.choices) == [name]
        assert alone.choices[name].prog == f"btrdelta {name}"
        assert (Path(__file__).parents[2] / "src/btrdelta/cli" / f"{module}.py").is_file()


_IMPORTED = ("import sys\nfrom btrdelta.cli import main\ntry:\n    main({argv!r})\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('btrdelta.cli.')))")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["no-such-command"], []])
def test_version_and_help_import_no_command(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORTED.format(argv=argv)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == ("['btrdelta.cli._common', 'btrdelta.cli._lean', "
                                            "'btrdelta.cli._parser']")
    if argv == ["--version"]:
        assert proc.stdout.startswith("btrdelta ")
    elif argv == ["--help"]:
        assert "tree-sum" in proc.stdout
    elif argv:  # the mistyped name, and the commands there are
        assert "invalid choice: 'no-such-command'" in proc.stderr
        assert "tree-sum" in proc.stderr  # (3.12.8+ and 3.13 list the choices unquoted)
    else:
        assert "usage: btrdelta" in proc.stderr


def test_a_command_imports_only_its_module() -> None:
    """A command imports its module and the CLI's shared ones it uses (``dump``: the input's,
    :mod:`btrdelta.cli._input`), no other command's."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTED.format(argv=["dump", "--help"])],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "['btrdelta.cli._common', 'btrdelta.cli._input', 'btrdelta.cli._lean', "
        "'btrdelta.cli._parser', 'btrdelta.cli.dump_cmd']")



def _brought_by(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``modules`` alone (what the
    standard library imports for itself on this Python)."""
    script = f"import sys\nfor m in {modules!r}:\n    __import__(m)\nprint(sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    return set(ast.literal_eval(proc.stdout))

def test_a_sendshot_send_imports_no_thread_pool_or_logging(tmp_path: Path) -> None:
    """``send --record`` and ``send --from-sendshot`` (hashing threads included) import
    neither ``concurrent.futures`` nor the ``logging`` it pulls in (~4 ms of every small
    send's start): the hashing threads are send/hashing.py's own. Nor ``locale``: argparse's
    message lookups are not made (cli/_common.py). Nor ``platform`` and ``gettext``, which
    ``uuid`` and ``argparse`` import for what the CLI never uses (cli/_lean.py). The full
    send with its record imports no ``typing`` (~3 % of a small send): annotations are not
    evaluated, zstandard's C backend is loaded without its package (btrdelta/_zstd.py);
    nor ``argparse`` and the ``re`` it imports: its plain words are read without building
    the parser (cli/_common.py ``quick_parse``). Nor ``importlib`` and the ``warnings`` its
    package imports (~0.45 ms): modules named at run time are imported with
    ``btrdelta._import_module``. (The incremental of a directory that is
    not a btrfs subvolume matches files by content-defined chunks: pyfastcdc imports
    typing; the change sweep on btrfs does not.)"""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):  # several batches for the hashing threads
        (src / f"f{i}").write_bytes(os.urandom(2000 + 977 * i))
    store = tmp_path / "store"
    script = (
        "import sys\nfrom btrdelta.cli import main\n"
        f"a = main(['send', {str(src)!r}, '-o', {str(tmp_path / 's0')!r}, '--record', "
        f"'--store', {str(store)!r}, '-q'])\n"
        "print(sorted(m for m in ('typing', 'zstandard', 'argparse', 're')\n"
        "             if m in sys.modules))\n"
        f"open({str(src / 'f1')!r}, 'ab').write(b'x')\n"
        f"b = main(['send', {str(src)!r}, '-o', {str(tmp_path / 's1')!r}, '--record', "
        f"'--store', {str(store)!r}, '--from-sendshot', 'latest', '-q'])\n"
        "print(a, b, sorted(m for m in ('concurrent.futures', 'logging', 'locale', 'platform',\n"
        "                               'gettext', 'signal', 'importlib', 'warnings')\n"
        "                   if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[-2:]
    # (what the standard library's own modules import on this Python is not the CLI's:
    # 3.13's threading imports warnings)
    brought = _brought_by("threading")
    assert ast.literal_eval(first) == sorted(brought & {"typing", "zstandard", "argparse",
                                                          "re"})
    assert second.startswith("0 0 ")
    assert ast.literal_eval(second[4:]) == sorted(brought & {
        "concurrent.futures", "logging", "locale", "platform", "gettext", "signal",
        "importlib", "warnings"})
    assert len(os.listdir(store / "records")) == 2


def test_a_sendshot_send_reads_its_base_ahead_as_the_cli_would(tmp_path: Path) -> None:
    """``btrdelta send --from-sendshot`` from the console entry has its base record read
    ahead by a thread (btrdelta/tree/early.py) while the CLI's modules load: the stream
    is the one ``main`` makes without it, and the entry still imports
    neither ``platform`` nor ``gettext`` (the CLI's package is imported before the stream's,
    whose ``uuid`` would import ``platform``: cli/_lean.py)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}").write_bytes(os.urandom(3000 + 977 * i))
    streams = {}
    for how in ("main", "entry"):
        store = tmp_path / f"store-{how}"
        assert main(["send", str(src), "-o", str(tmp_path / "full"), "--record", "--store",
                     str(store), "--name", "s0", "-q"]) == 0
    (src / "f3").write_bytes(b"changed")
    (src / "new").write_bytes(os.urandom(5000))
    for how in ("main", "entry"):
        out = tmp_path / f"inc-{how}"
        argv = ["send", str(src), "-o", str(out), "--record", f"--store={tmp_path}/store-{how}",
                "--name", "s1", "--from-sendshot", "latest", "--json"]
        if how == "main":
            assert main(argv) == 0
            continue
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "btrdelta", *argv],
                              capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 0, proc.stderr
        imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:") and "imported package" not in line]
        assert "btrdelta.tree.early" in imported
        assert not {"platform", "gettext"} & set(imported)
    for how in ("main", "entry"):
        streams[how] = (tmp_path / f"inc-{how}").read_bytes()
        assert len(os.listdir(tmp_path / f"store-{how}" / "records")) == 2
    assert streams["main"] == streams["entry"]


def test_a_delta_receive_imports_no_typing_dataclasses_or_thread_pool(tmp_path: Path) -> None:
    """``btrdelta receive`` of a delta stream (the command's module, the receive, the
    expansion with its patch codecs, the recompression and the old files' checks) imports
    neither ``typing`` nor ``dataclasses`` (with its ``inspect``, ``ast``, ``dis``...), nor
    ``concurrent.futures`` with its ``logging`` (btrdelta/_pool.py), nor ``zstandard``'s
    package (its C backend only: btrdelta/_zstd.py): ~20 ms of every receive's start-up
    that ``btrfs receive`` does not have (issue 12). Nor ``signal``, which makes three
    enums at import (the CLI takes ``_signal``), nor the ``crc32c`` package, whose import
    reads package metadata (btrdelta/stream/crc.py). Nor ``re``, ``urllib.parse``,
    ``ipaddress`` and ``warnings``, which ``pathlib`` imports for what the receive never
    asks of it (btrdelta/_pathlib.py), nor ``importlib`` (``btrdelta._import_module``)."""
    old, stream = _setup(tmp_path)
    delta = tmp_path / "D"
    assert main(["delta", "make", "-q", "-f", str(stream), "--old", str(old), "-o",
                 str(delta), "--codec", "zstd", "-j", "1"]) == 0
    script = (
        "import sys\n"
        "import btrdelta.cli.receive_cmd, btrdelta.update.receive\n"
        "from btrdelta.delta.events import expand_events\n"
        f"with open({str(delta)!r}, 'rb') as f:\n"
        f"    n = sum(len(b) for b in expand_events(f, {str(old)!r}).batches())\n"
        "print(n, sorted(m for m in ('typing', 'dataclasses', 'inspect', 'concurrent.futures',\n"
        "                            'logging', 'zstandard', 'json', 'signal', 'crc32c',\n"
        "                            're', 'urllib.parse', 'ipaddress', 'warnings',\n"
        "                            'importlib')\n"
        "                if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, imported = proc.stdout.split(" ", 1)
    assert int(count) > 3  # (the stream's records: the expansion ran)
    # (3.13's pathlib is a package whose glob imports re, and threading imports warnings:
    # btrdelta._pathlib cannot keep them out there)
    assert ast.literal_eval(imported.strip()) == sorted(
        _brought_by("threading", "btrdelta._pathlib") & {
            "typing", "dataclasses", "inspect", "concurrent.futures", "logging", "zstandard",
            "json", "signal", "crc32c", "re", "urllib.parse", "ipaddress", "warnings",
            "importlib"})


@pytest.mark.parametrize(("argv", "want"), [
    (["receive", "A.stream", "-q", "dest"], {"input": "A.stream", "dest": "dest", "quiet": True}),
    (["receive", "-q", "A.stream", "dest"], {"input": "A.stream", "dest": "dest", "quiet": True}),
    (["receive", "dest"], {"input": "dest", "dest": None}),  # one: DEST, the stream on stdin
    (["replicate", "/data", "--store", "s", "/backup"],
     {"source": "/data", "dest": "/backup", "store": "s"}),
    (["image", "clone", "x.caibx", "--castr", "c", "st/img"],
     {"source": "x.caibx", "target": "st/img", "castr": ["c"]}),
    (["sendshot", "delete", "a", "--store", "s", "b"], {"ids": ["a", "b"], "store": "s"}),
    (["repo", "add", "www", "-q", "1.0", "/build"],
     {"repo": "www", "version": "1.0", "source": "/build"}),
])
def test_positionals_between_options(argv: list[str], want: dict[str, object]) -> None:
    """Positionals may come between options: argparse alone gave an optional positional
    nothing when an option followed its value (`receive A.stream -q dest` took A.stream for
    DEST, then refused 'dest': 'unrecognized arguments')."""
    args = build_parser(argv[0]).parse_args(argv)
    assert {k: getattr(args, k) for k in want} == want


def test_lean_imports_leave_the_real_modules() -> None:
    """cli/_lean.py imports argparse and uuid with stand-ins for gettext and platform (and
    uuid without _uuid), and removes them: a later import gets the real modules, and
    argparse and uuid work."""
    script = (
        "import sys\nimport btrdelta.cli\n"
        "print(sorted(m for m in ('platform', 'gettext', '_uuid') if m in sys.modules))\n"
        "import argparse, gettext, platform, uuid, _uuid\n"
        "print(platform.system(), bool(platform.python_version()), gettext.gettext('x'),\n"
        "      hasattr(uuid, 'platform'), uuid.uuid4().version, str(uuid.UUID(int=1))[-4:],\n"
        "      argparse.ngettext('a', 'b', 2), uuid._uuid, hasattr(_uuid, '__file__'),\n"
        "      uuid.uuid1(node=1, clock_seq=2).version)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    # (uuid without _uuid: uuid1 is its pure-Python one; _uuid itself imports later)
    assert proc.stdout.splitlines() == ["[]", "Linux True x False 4 0001 b None True 1"]


def test_lean_import_falls_back_to_the_real_module(tmp_path: Path) -> None:
    """A module that takes more from the stood-in one than the stand-in has (another
    Python's argparse, say) is imported with the real one, not left half-imported."""
    (tmp_path / "wants_more.py").write_text("from gettext import dgettext\nOK = dgettext\n")
    script = (
        "import sys\nfrom btrdelta.cli import _lean\n"
        "sys.modules.pop('gettext', None)\n"
        "_lean._import_with('wants_more', 'gettext', {'gettext': _lean._message})\n"
        "import wants_more, gettext\n"
        "print(wants_more.OK is gettext.dgettext, type(gettext.GNUTranslations).__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "type"]


def test_lean_imports_stand_in_nothing_while_another_thread_runs() -> None:
    """A program that imports the CLI while another of its threads runs could have that
    thread import the stand-in: the real modules are imported then."""
    script = (
        "import sys, threading\n"
        "stop = threading.Event()\n"
        "t = threading.Thread(target=stop.wait)\nt.start()\n"
        "import btrdelta.cli\nfrom btrdelta.cli import _lean\n_lean.argparse\n"
        "stop.set()\nt.join()\n"
        "print(sorted(m for m in ('platform', 'gettext') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    # as the real modules import them: both until 3.12; 3.13's uuid imports platform only
    # off Linux
    real = subprocess.run(
        [sys.executable, "-c", "import sys, argparse, uuid\n"
         "print(sorted(m for m in ('platform', 'gettext') if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert real in ("['gettext', 'platform']", "['gettext']")
    assert proc.stdout.split("\n")[0] == real
