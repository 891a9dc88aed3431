"""The codec interface shared by every delta codec."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar

from ...errors import BtrdeltaError

__all__ = ["Codec", "CodecUnavailableError"]

#: Largest new content a patch may declare when the caller gives no expectation.
DEFAULT_MAX_SIZE = 1 << 32


class CodecUnavailableError(BtrdeltaError):
    """The library a codec needs is not installed."""


class Codec:
    """A binary delta codec: ``make(old, new) -> patch``, ``apply(old, patch) -> new``.

    Subclasses set ``codec_id`` (stable, stored in streams), ``name`` (CLI spelling) and
    ``module`` (the Python package they need).
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    module: ClassVar[str]
    package: ClassVar[str]

    def __init__(self) -> None:
        self._mod: ModuleType | None = None
        self._missing: str | None = None

    def lib(self) -> Any:
        """The imported library (raises :class:`CodecUnavailableError` if missing)."""
        if self._mod is None:
            if self._missing is None:
                try:
                    self._mod = importlib.import_module(self.module)
                except ImportError as exc:
                    self._missing = str(exc)
            if self._mod is None:
                raise CodecUnavailableError(
                    f"codec {self.name!r} is unavailable: Python package {self.package!r} "
                    f"is not installed ({self._missing})"
                )
        return self._mod

    def available(self) -> bool:
        """Whether the codec's library can be imported."""
        try:
            self.lib()
        except CodecUnavailableError:
            return False
        return True

    def require(self) -> None:
        """Raise :class:`CodecUnavailableError` if the library is missing."""
        self.lib()

    def make(self, old: bytes, new: bytes) -> bytes:
        """A patch that turns ``old`` into ``new``."""
        raise NotImplementedError

    def apply(self, old: bytes, patch: bytes, *, new_size: int | None = None) -> bytes:
        """Apply ``patch`` to ``old``.

        Args:
            old: the old content the patch was made against.
            patch: untrusted patch bytes.
            new_size: the size the result must have (checked against the patch header
                before any allocation); ``None``: at most 4 GiB.

        Raises:
            StreamFormatError: the patch is malformed or declares another size.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<codec {self.name} id={self.codec_id}>"
