"""Stream tests run once per backend: the C accelerator (``_speedups``) and pure Python."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import btrdelta.stream as stream

BACKENDS = ["c", "python"]


def c_available() -> bool:
    """Whether the C accelerator was built (under CI=true it must be)."""
    return stream._c_speedups is not None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Make ``request.param`` the live implementation for one test, then restore."""
    name: str = request.param
    if name == "c" and not c_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but btrdelta.stream._speedups is not built")
        pytest.skip("C accelerator not built")
    before = stream.BACKEND
    stream._use_backend(name)
    try:
        yield name
    finally:
        stream._use_backend(before)
