"""Fixtures for chunk tests: one pair of real ext4 images per session."""

from __future__ import annotations

import pytest

from .images import ImagePair, build_pair


@pytest.fixture(scope="session")
def image_pair(tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return build_pair(tmp_path_factory.mktemp("images"))
