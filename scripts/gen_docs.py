"""Regenerate the parts of the docs that are made from the code.

- ``docs/formats/send-stream.md``: the command, attribute and limit tables
  (``btrdelta.stream.constants``);
- ``README.md``: the exit-code table (``btrdelta.errors``).

``python scripts/gen_docs.py`` rewrites the text between each page's GENERATED markers;
``--check`` exits 1 if a page is out of date (a test runs it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from btrdelta.errors import exit_codes
from btrdelta.stream.constants import ATTR_KIND, ATTR_VERSION, COMMAND_SPECS, MAX_PAYLOAD

ROOT = Path(__file__).resolve().parent.parent


def send_stream_tables() -> str:
    out = ["### Commands (attributes in the order the kernel emits them)", "",
           "| # | command | since | attributes (`?` = may be absent) |", "|---|---|---|---|"]
    for cmd, spec in sorted(COMMAND_SPECS.items()):
        attrs = ", ".join(f.attr.name + ("?" if f.optional else "") for f in spec.fields)
        out.append(f"| {int(cmd)} | {cmd.name} | v{spec.version} | {attrs or '(none)'} |")
    out += ["", "### Attributes", "", "| # | attribute | since | encoding |", "|---|---|---|---|"]
    for attr, kind in sorted(ATTR_KIND.items()):
        out.append(f"| {int(attr)} | {attr.name} | v{ATTR_VERSION[attr]} | {kind.value} |")
    out += ["", "### Limits", "", "| version | largest command payload (bytes) |", "|---|---|"]
    for version, limit in sorted(MAX_PAYLOAD.items()):
        out.append(f"| {version} | {limit} |")
    return "\n".join(out)


def exit_code_table() -> str:
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in exit_codes()]
    return "\n".join(rows)


#: page -> (marker name, generator)
PAGES: dict[str, tuple[str, Callable[[], str]]] = {
    "docs/formats/send-stream.md": ("TABLES", send_stream_tables),
    "README.md": ("EXIT CODES", exit_code_table),
}


def regenerate(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED {name} -->", f"<!-- END GENERATED {name} -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv: list[str]) -> int:
    stale = []
    for page, (name, make) in PAGES.items():
        path = ROOT / page
        text = path.read_text()
        new = regenerate(text, name, make())
        if new == text:
            continue
        if "--check" in argv:
            stale.append(page)
        else:
            path.write_text(new)
    if stale:
        print(f"out of date: {', '.join(stale)}: run python scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
