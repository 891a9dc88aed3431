"""The examples of docs/api.md run, in order, as the page says (an empty directory)."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

import btrdelta

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples() -> None:
    assert len(_blocks()) >= 5


def test_every_public_name_is_documented() -> None:
    text = DOC.read_text()
    for name in btrdelta.__all__:
        if not name.startswith("_") and name != "BtrdeltaError":
            assert f"`{name}(" in text, name
            assert callable(getattr(btrdelta, name))


def test_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("the examples receive as root (owners are set)")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    for block in _blocks():
        exec(compile(block, str(DOC), "exec"), scope)


def test_every_package_says_what_it_exports() -> None:
    src = Path(btrdelta.__file__).parent
    packages = sorted(p.parent for p in src.glob("*/__init__.py"))
    assert len(packages) >= 13
    for path in packages:
        module = importlib.import_module(f"btrdelta.{path.name}")
        assert isinstance(getattr(module, "__all__", None), list), path.name
        for name in module.__all__:  # a name the package defines, or one of its modules
            assert hasattr(module, name) or (path / f"{name}.py").exists() \
                or (path / name / "__init__.py").exists(), f"{path.name}.{name}"


def test_make_delta_refuses_an_unknown_carrier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="carrier must be 'auto', 'zstd' or 'xz', not 'lz4'"):
        btrdelta.make_delta(tmp_path / "none.stream", tmp_path, tmp_path / "d", carrier="lz4")
    assert not (tmp_path / "d").exists()
