"""Stream tests run once per backend: the C accelerator (``_speedups``) and pure Python."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from btrdelta import _native

BACKENDS = ["c", "python"]


def c_available() -> bool:
    """Whether the C accelerator was built (under CI=true it must be)."""
    return _native.available("speedups")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Make ``request.param`` the stream accelerator's backend for one test."""
    name = request.param
    if name == "c" and not c_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but btrdelta.stream._speedups is not built")
        pytest.skip("C accelerator not built")
    with _native.use_backend(name, "speedups"):
        yield name
