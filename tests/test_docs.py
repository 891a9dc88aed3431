"""The pages generated from the code (format tables, exit codes) must not drift."""

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

from btrdelta.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_generated_docs_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gen_docs.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def _doc_commands(text: str) -> list[str]:
    """The ``btrdelta ...`` commands of a page's shell blocks (continuations joined,
    comments dropped, split at pipes, ``&&``, ``;`` and ``&``)."""
    found = []
    for block in re.findall(r"^```(?:sh|console|bash)?\n(.*?)^```", text, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            for part in re.split(r"\|\||&&|[|;&]", line):
                part = part.strip()
                if part.startswith("btrdelta ") and "$(" not in part:
                    found.append(part)
    return found


def test_every_documented_command_line_parses() -> None:
    # a command, option or argument renamed or removed must not linger in the README or
    # docs/ (a new user types them as shown); "[...]" marks optional words
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    lines = [(page.name, line) for page in pages for line in _doc_commands(page.read_text())]
    assert len(lines) >= 80
    failures = []
    for page, line in lines:
        words = [w for w in shlex.split(line.replace("[", "").replace("]", ""))[1:]
                 if not w.startswith((">", "<"))]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser(words[0]).parse_args(words)
        except SystemExit as exc:
            if exc.code:
                failures.append(f"{page}: {line}: {err.getvalue().strip()}")
    assert not failures, "\n".join(failures)


def test_upstream_coverage_page_names_what_exists() -> None:
    # docs/upstream-tests.md maps each upstream send/receive test to a scenario or a test:
    # every scenario named after an xfstests number is in it, and every scenario and test
    # function it names exists
    from btrdelta.testing.scenarios import MATRIX_SCENARIOS

    page = (ROOT / "docs" / "upstream-tests.md").read_text()
    names = {sc.name for sc in MATRIX_SCENARIOS}
    missing = [n for n in names if re.search(r"-\d{3}$", n) and f"`{n}`" not in page]
    assert not missing
    quoted = set(re.findall(r"`([a-z0-9][a-z0-9-]*-(?:\d{3}|misc\d{3}))`", page))
    assert len(quoted) >= 70
    assert quoted <= names, quoted - names
    tests = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", page))
    sources = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert len(tests) >= 15
    assert [t for t in tests if f"def {t}(" not in sources] == []


def test_every_relative_link_names_a_file_that_exists() -> None:
    # a page moved or renamed must not leave a dead link in the README or docs/ (a new
    # user follows them from the README first); links inside code blocks are examples
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    links = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        links += [(page, target.split("#")[0])
                  for target in re.findall(r"\]\(([^)\s]+)\)", text)
                  if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]
    assert len(links) >= 30
    dead = [f"{page.relative_to(ROOT)}: {target}" for page, target in links
            if not (page.parent / target).exists()]
    assert not dead, "\n".join(dead)
