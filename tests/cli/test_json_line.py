"""``--json`` reports made without importing ``json`` (cli/_common.py ``json_line``) are what
``json.dumps`` makes of them (the oracle), for random flat reports and for values it leaves
to ``json.dumps`` (nested, NaN, infinities, subclasses of ``int``, keys that are not text);
and a ``send --json`` prints its report without importing ``json`` or ``re``."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from btrdelta.cli._common import json_line

_FLAT = st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                  st.floats(allow_nan=False, allow_infinity=False))
_ANY = st.one_of(_FLAT, st.floats(), st.lists(_FLAT, max_size=3),
                 st.dictionaries(st.text(max_size=3), _FLAT, max_size=2))


@given(st.dictionaries(st.text(), _FLAT, max_size=12))
def test_a_flat_report_is_what_json_dumps_makes(report: dict[str, object]) -> None:
    assert json_line(report) == json.dumps(report)
    assert json.loads(json_line(report)) == report


@given(st.dictionaries(st.text(max_size=4), _ANY, max_size=6))
def test_any_report_is_what_json_dumps_makes(report: dict[str, object]) -> None:
    assert json_line(report) == json.dumps(report)


class _Size(enum.IntEnum):
    BIG = 2**40


def test_values_it_does_not_write_itself_go_to_json_dumps() -> None:
    for report in ({"n": float("nan")}, {"n": float("-inf")}, {"n": _Size.BIG},
                   {"n": True, 1: "one"}, {"n": [1, "\u00e9"]}, {"é\n\"": "\udc80\x00"}):
        assert json_line(report) == json.dumps(report)  # type: ignore[arg-type]


def test_send_json_imports_neither_json_nor_re(tmp_path: Path) -> None:
    """(As the sendshot benchmark's read-only side sends: a send with its record imports
    no ``re``, tests/cli/test_entry.py.)"""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    out = tmp_path / "s"
    script = (
        "import sys\nfrom btrdelta.cli import main\n"
        f"code = main(['send', {str(src)!r}, '-o', {str(out)!r}, '--json', '--record', "
        f"'--store', {str(tmp_path / 'store')!r}])\n"
        "print(code, sorted(m for m in ('json', '_json', 're', 'argparse') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report, last = proc.stdout.splitlines()
    assert last == "0 []"
    got = json.loads(report)
    assert got["output"] == str(out)
    assert got["bytes"] == out.stat().st_size > 5000
    assert report == json.dumps(got)
