"""Release trees of a real wheel (MarkupSafe, nine releases), downloaded once per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from btrdelta.testing.wheels import MARKUPSAFE, release_trees

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "btrdelta-tests"


@pytest.fixture(scope="session")
def releases() -> list[Path]:
    trees = release_trees(*MARKUPSAFE, CACHE)
    if trees is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pip download of the MarkupSafe wheels failed under CI")
        pytest.skip("pip download of the MarkupSafe wheels failed (no network?)")
    return trees
