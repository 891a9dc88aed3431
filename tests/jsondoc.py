"""The ``--json`` keys docs/cli-json.md documents, checked wherever a test runs the command.

:func:`checked` is wrapped around the parsed output of a command in the tests that drive it
with real data (``checked("device status", json.loads(out))``): its top-level keys (of each
item, for a list) must be exactly the ones of the section ``## `btrdelta COMMAND --json```.
``tests/cli/test_conventions.py`` checks that every documented command is checked somewhere.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli-json.md"


@functools.cache
def documented() -> dict[str, set[str]]:
    """Section title -> the keys of its table (rows ``| `key` | type | meaning |``)."""
    out: dict[str, set[str]] = {}
    for section in DOC.read_text().split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        keys = {line.split("`")[1] for line in body.splitlines() if line.startswith("| `")}
        if keys:
            out[title] = keys
    return out


def title(command: str) -> str:
    """The section title of ``command`` (``"repo add"``)."""
    return f"`btrdelta {command} --json`"


def checked(command: str, doc: Any) -> Any:
    """``doc`` (the parsed ``--json`` output of ``command``), its keys checked."""
    record = os.environ.get("JSONDOC_RECORD")
    if record:  # collecting what the commands print (to write the doc): no check
        with open(record, "a") as f:
            for item in doc if isinstance(doc, list) else [doc]:
                f.write(json.dumps({"command": command, "keys": {
                    k: type(v).__name__ for k, v in item.items()}}) + "\n")
        return doc
    keys = documented().get(title(command))
    assert keys is not None, f"docs/cli-json.md has no section {title(command)}"
    for item in doc if isinstance(doc, list) else [doc]:
        assert set(item) == keys, (command, "differs in", sorted(set(item) ^ keys))
    return doc
