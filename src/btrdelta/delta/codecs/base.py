"""The codec interface shared by every delta codec."""

from __future__ import annotations

from types import ModuleType

from ... import TYPE_CHECKING, _import_module
from ..._optional import OPTIONAL
from ...errors import MissingDependencyError

if TYPE_CHECKING:
    from typing import Any, ClassVar

    from .._hpatch import Output

__all__ = ["Codec", "CodecUnavailableError"]

#: Largest new content a patch may declare when the caller gives no expectation.
DEFAULT_MAX_SIZE = 1 << 32


class CodecUnavailableError(MissingDependencyError):
    """The library a codec needs is not installed (``hdiffpatch`` comes with the ``[hdiff]``
    and ``[make]`` extras)."""

    def __init__(self, package: str, *, what: str = "") -> None:
        super().__init__(package, OPTIONAL.get(package, ("",))[0], what=what)


class Codec:
    """A binary delta codec: ``make(old, new) -> patch``, ``apply(old, patch) -> new``.

    Subclasses set ``codec_id`` (stable, stored in streams), ``name`` (CLI spelling) and
    ``module`` (the Python package they need).
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    module: ClassVar[str]
    package: ClassVar[str]
    #: :meth:`apply` takes any buffer as ``old`` (a read-only mapping of the old file,
    #: :func:`btrdelta.delta.oldfiles.map_old_file`), not only ``bytes``
    takes_buffers: ClassVar[bool] = False

    def __init__(self) -> None:
        self._mod: ModuleType | None = None
        self._missing = False

    def lib(self) -> Any:
        """The imported library (raises :class:`CodecUnavailableError` if missing)."""
        if self._mod is None:
            if not self._missing:
                try:
                    self._mod = _import_module(self.module)
                except ImportError:
                    self._missing = True
            if self._mod is None:
                raise CodecUnavailableError(self.package, what=f"codec {self.name!r} ")
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

    def apply_over(self, old: bytes, patch: bytes, *, new_size: int,
                   old_fd: int) -> bytes | Output:
        """:meth:`apply`, where ``old`` is the content of file ``old_fd``, which cannot
        change (a read-only snapshot's): a codec may map its result over that file (a
        read-only buffer whose pages the patch leaves alone stay the file's, not fresh
        memory: the HDIFF13 applier). Here: :meth:`apply`."""
        return self.apply(old, patch, new_size=new_size)

    def __repr__(self) -> str:
        return f"<codec {self.name} id={self.codec_id}>"
