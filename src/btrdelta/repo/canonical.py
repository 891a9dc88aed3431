"""Canonical JSON and strict field access for repository metadata (pure).

Signed metadata is JSON; what a signature covers is the *canonical* encoding of the
``signed`` object (as TUF does): UTF-8, object keys sorted by code point, no insignificant
whitespace, no floats (integers, strings, booleans, null, arrays and objects only). A reader
parses the file, re-encodes ``signed`` canonically and checks the signature over those
bytes, so layout and key order of the file itself do not matter.

:class:`Fields` reads a decoded object with one-line errors naming the file and the field
(``index/7.json: versions[3].name: not a string``), never a ``KeyError`` or ``TypeError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import StreamFormatError

__all__ = ["HEX64", "Fields", "canonical", "parse_json"]

#: metadata files are small; a larger one is refused before it is parsed
MAX_METADATA = 16 << 20
HEX64 = re.compile(r"[0-9a-f]{64}")


def _check(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        raise StreamFormatError(f"{where}: floats are not allowed in canonical JSON")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StreamFormatError(f"{where}: object key {key!r} is not a string")
            _check(item, f"{where}.{key}")
        return
    raise StreamFormatError(f"{where}: {type(value).__name__} is not JSON")


def canonical(value: Any, *, parsed: bool = False) -> bytes:
    """The canonical encoding of ``value`` (the bytes signatures cover).

    ``parsed``: ``value`` came from :func:`parse_json`, which admits nothing else than
    canonical JSON values (no floats), so the check is skipped.
    """
    if not parsed:
        _check(value, "$")
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_floats(text: str) -> NoReturn:
    raise ValueError(f"float {text} is not allowed")


def parse_json(data: bytes, source: str) -> Any:
    """Decode a metadata file (UTF-8 JSON without floats); one-line errors."""
    if len(data) > MAX_METADATA:
        raise StreamFormatError(f"larger than {MAX_METADATA} bytes", source=source)
    try:
        return json.loads(data.decode("utf-8"), parse_float=_no_floats,
                          parse_constant=_no_floats)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StreamFormatError(f"not valid JSON: {exc}", source=source) from None


class Fields:
    """Typed access to one decoded JSON object, errors naming ``source`` and the path."""

    def __init__(self, obj: Any, source: str, path: str = "") -> None:
        self.source = source
        self.path = path
        if not isinstance(obj, dict):
            self.fail("not a JSON object")
        self.obj: dict[str, Any] = obj

    def fail(self, why: str, key: str | None = None) -> NoReturn:
        """Raise the one-line error for ``key`` (or this object)."""
        where = self._at(key) if key is not None else (self.path or "top level")
        raise StreamFormatError(f"{where}: {why}", source=self.source)

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Any:
        """The raw value of a required key."""
        if key not in self.obj:
            self.fail("missing", key)
        return self.obj[key]

    def integer(self, key: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        """A required integer in ``[lo, hi]``."""
        value = self.get(key)
        if type(value) is not int or not lo <= value <= hi:
            self.fail(f"not an integer in [{lo}, {hi}]", key)
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        """A required string (matching ``pattern`` when given)."""
        value = self.get(key)
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail("not a string" if pattern is None else "malformed string", key)
        return value

    def hex64(self, key: str) -> str:
        """64 lowercase hex digits."""
        return self.text(key, HEX64)

    def array(self, key: str, max_len: int = 1 << 24) -> list[Any]:
        """A required array of at most ``max_len`` items."""
        value = self.get(key)
        if not isinstance(value, list) or len(value) > max_len:
            self.fail("not an array" if not isinstance(value, list) else "too long", key)
        return value

    def sub(self, key: str) -> Fields:
        """A required nested object."""
        return Fields(self.get(key), self.source, self._at(key))

    def items(self, key: str) -> Iterator[Fields]:
        """The objects of a required array of objects."""
        for i, item in enumerate(self.array(key)):
            yield Fields(item, self.source, f"{self._at(key)}[{i}]")

    def expect(self, key: str, value: Any) -> None:
        """The key must hold exactly ``value``."""
        if self.get(key) != value:
            self.fail(f"is {self.obj[key]!r}, expected {value!r}", key)
