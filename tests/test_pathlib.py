"""``btrdelta._pathlib``: ``pathlib`` imported for the receive without ``re``, ``fnmatch``,
``urllib.parse`` (and its ``ipaddress``), ``ntpath`` and ``warnings``, and every part of
``pathlib`` still working, with the real modules, in the same process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_LATER = "('re', 'fnmatch', 'urllib.parse', 'ipaddress', 'ntpath', 'warnings')"


def _run(script: str, *options: str) -> list[str]:
    proc = subprocess.run([sys.executable, *options, "-c", script], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines() + proc.stderr.splitlines()


#: 3.13's pathlib is a package whose glob compiles patterns at import: btrdelta._pathlib
#: imports it for real there (what it brings, it brings)
_PACKAGE = sys.version_info >= (3, 13)


def test_the_receive_imports_pathlib_without_its_pattern_and_uri_modules() -> None:
    out = _run("import sys\nimport btrdelta.cli, btrdelta.receive\n"
               f"print(sorted(m for m in {_LATER} if m in sys.modules), 'pathlib' in sys.modules)")
    if _PACKAGE:
        plain = _run(f"import sys, pathlib\nprint(sorted(m for m in {_LATER} if m in sys.modules))")
        assert out == [f"{plain[0]} True"]
    else:
        assert out == ["[] True"]


def test_pathlib_works_whole_and_later_imports_get_the_real_modules(tmp_path: Path) -> None:
    """Globbing, matching, URIs, Windows paths and pathlib's deprecation warning, each
    against the same call in a process that imported ``pathlib`` itself."""
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.py").write_text("x")
    calls = (
        "import sys\n"  # (the same line numbers in both runs: the warning names its line)
        "from pathlib import Path, PurePosixPath, PureWindowsPath\n"
        f"p = Path({str(tmp_path)!r})\n"
        "print(sorted(x.name for x in p.glob('*.txt')), sorted(x.name for x in p.rglob('?.py')))\n"
        "print(PurePosixPath('/a/b/c.py').match('b/*.py'), PurePosixPath('/a b/%').as_uri())\n"
        "print(PureWindowsPath('C:/x/y') / 'z', PureWindowsPath('c:/A').as_uri())\n"
        "if sys.version_info < (3, 13):  # (deprecated in 3.11, gone in 3.13)\n"
        "    with p:\n        pass\n"
        "import re, fnmatch, ntpath, warnings, urllib.parse, ipaddress\n"
        "print(re.compile('a+').fullmatch('aa') is not None, fnmatch.fnmatch('ab', 'a?'),\n"
        "      ntpath.join('a', 'b'), urllib.parse.quote('a b'), ipaddress.ip_address('::1'))\n"
        "print(type(sys.modules['re']).__name__, hasattr(warnings, 'catch_warnings'))\n"
    )
    ours = _run("import btrdelta.receive; " + calls, "-W", "always")
    assert ours == _run(calls, "-W", "always")
    assert "module True" in ours  # (then the warning, before 3.13: stderr)
    assert "DeprecationWarning" in ours[-1] or sys.version_info >= (3, 13)


def test_pathlib_is_imported_as_it_is_while_another_thread_runs() -> None:
    out = _run("import sys, threading\n"
               "stop = threading.Event()\n"
               "t = threading.Thread(target=stop.wait)\nt.start()\n"
               "import btrdelta.receive\nimport pathlib\n"
               "stop.set()\nt.join()\n"
               f"print(sorted(m for m in {_LATER} if m in sys.modules),\n"
               "      type(getattr(pathlib, 're', sys.modules.get('re'))).__name__)")
    plain = _run(f"import sys, pathlib\nprint(sorted(m for m in {_LATER} if m in sys.modules))")
    assert out == [f"{plain[0]} module"]  # (pathlib as it is: its own imports, real ones)


def test_a_pathlib_that_asks_more_at_import_gets_the_real_modules(tmp_path: Path) -> None:
    """A Python whose ``pathlib`` uses a stood-in module at import: imported for real."""
    (tmp_path / "pathlib.py").write_text(
        "import re\nPATTERN = re.compile('x')\nfrom urllib.parse import quote_from_bytes\n")
    out = _run(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
               "import btrdelta._pathlib, pathlib\n"
               "print(pathlib.PATTERN.pattern, pathlib.re is sys.modules['re'],\n"
               "      pathlib.quote_from_bytes(b'a b'))")
    assert out == ["x True a%20b"]
