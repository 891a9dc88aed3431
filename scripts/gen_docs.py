"""Regenerate the command and attribute tables in docs/formats/send-stream.md from the code.

``python scripts/gen_docs.py`` rewrites the part between the GENERATED markers;
``--check`` exits 1 if the page is out of date (a test runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from btrdelta.stream.constants import ATTR_KIND, ATTR_VERSION, COMMAND_SPECS, MAX_PAYLOAD

DOC = Path(__file__).resolve().parent.parent / "docs/formats/send-stream.md"
BEGIN, END = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"


def tables() -> str:
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


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{tables()}\n{END}{tail}"
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
