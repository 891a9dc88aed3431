"""The one exception tree of btrdelta.

Every error a caller can act on derives from :class:`BtrdeltaError`; each carries where it
happened (``source`` name, byte ``offset``, record ``index``, ``path``) and the exit code the
CLI uses. ``str(err)`` is a single line naming what and where, e.g.
``stream.bin: offset 81920, record 17 (WRITE): CRC32C mismatch``.

::

    BtrdeltaError                 exit 1
    ├── StreamFormatError         exit 3  bad stream / archive / patch bytes, truncation;
    │                                     a damaged key or state file
    │   ├── ChecksumError         exit 5  a CRC or digest did not match (expected, actual)
    │   │   └── SignatureError    exit 5  missing, malformed or wrong signature, untrusted key
    │   └── UnsupportedVersionError exit 3
    ├── UnsafePathError           exit 4  '..', absolute, NUL, symlinked parent, outside DEST
    ├── MissingBaseError          exit 6  parent subvolume, delta base file, chunk not found
    │   └── MissingParentError    exit 6  an incremental stream's parent subvolume (``uuid``)
    ├── ApplyError                exit 8  an OSError while applying, with op and path
    ├── TransportError            exit 7  HTTP / network failure (url, status)
    ├── ProtocolError             exit 9  sender/receiver negotiation
    ├── MissingDependencyError    exit 10 an optional dependency (an extra) is not installed
    └── UsageError                exit 2  options that contradict each other (the CLI's)

Low-level exceptions (``struct.error``, ``IndexError``, ``UnicodeDecodeError``) never escape
a decoder; they are wrapped with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_HANGUP",
    "EXIT_TERMINATED",
    "ApplyError",
    "BtrdeltaError",
    "ChecksumError",
    "MissingBaseError",
    "MissingParentError",
    "MissingDependencyError",
    "ProtocolError",
    "SignatureError",
    "StreamFormatError",
    "TransportError",
    "UnsafePathError",
    "UnsupportedVersionError",
    "UsageError",
    "exit_codes",
    "shown",
    "warn",
]

#: exit codes no error class carries (the CLI's own)
EXIT_OK = 0
EXIT_USAGE = 2
#: a command ended by a signal exits 128 + its number (as a shell shows one it killed),
#: after its clean-up: SIGHUP, SIGINT (Ctrl-C), SIGTERM
EXIT_HANGUP = 129
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: what the CLI names itself by while a command runs (``btrdelta repo add``): a warning of
#: library code given no ``on_warning`` is then one line ``btrdelta repo add: warning: ...``
#: on standard error, not Python's ``file:line: RuntimeWarning`` and the line of code
warn_as: str | None = None


def warn(msg: str) -> None:
    """The default ``on_warning`` of the library (a receive's skipped xattr, flag, mode):
    one line on standard error under the CLI (:data:`warn_as`), else ``warnings.warn``."""
    if warn_as is not None:
        import sys

        print(f"{warn_as}: warning: {msg}", file=sys.stderr, flush=True)
        return
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def shown(text: str) -> str:
    """Another side's text that is printed (a peer's REFUSE, HELLO id and name, the last
    line a receiver wrote on its standard error, a client's request line in a server's
    log): its control characters escaped, as ``repr`` writes them (a newline in it printed
    a line of the peer's own, an ESC its terminal codes)."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show_path(path: bytes | str) -> str:
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return path


class BtrdeltaError(Exception):
    """Base of every btrdelta error; carries location fields and an exit code."""

    exit_code = 1
    #: what the exit code means, for the tables in ``--help`` and the README (classes that
    #: share their parent's code say nothing)
    meaning = "other error"

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        offset: int | None = None,
        index: int | None = None,
        command: str | None = None,
        path: bytes | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.offset = offset
        self.index = index
        self.command = command
        self.path = path

    def located(self, **where: object) -> BtrdeltaError:
        """Fill in location fields that are still unknown; returns ``self``."""
        for key, value in where.items():
            if value is not None and getattr(self, key, None) is None:
                setattr(self, key, value)
        return self

    def __str__(self) -> str:
        where: list[str] = []
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.index is not None:
            rec = f"record {self.index}"
            if self.command:
                rec += f" ({self.command})"
            where.append(rec)
        elif self.command:
            where.append(self.command)
        if self.path is not None:
            where.append(f"path {_show_path(self.path)!r}")
        text = ", ".join(where)
        if self.source:
            text = f"{self.source}: {text}" if text else self.source
        return f"{text}: {self.message}" if text else self.message


class StreamFormatError(BtrdeltaError):
    """Bytes that are not a valid stream, archive or patch (includes truncation), or a key
    or state file that is damaged (``cursors.json``, a replica's or a device's state)."""

    exit_code = 3
    meaning = "malformed stream, archive, patch, index, key or state file"


class ChecksumError(StreamFormatError):
    """A CRC or digest did not match."""

    exit_code = 5
    meaning = "checksum or signature mismatch (CRC, digest, Ed25519)"

    def __init__(
        self, message: str, *, expected: object = None, actual: object = None, **where: object
    ) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.expected = expected
        self.actual = actual


class SignatureError(ChecksumError):
    """A signature is missing, malformed, made by a key not trusted here, does not verify,
    or covers other content than the input's (``btrdelta.trust``)."""

    exit_code = 5


class UnsupportedVersionError(StreamFormatError):
    """A format version this build does not implement."""

    exit_code = 3


class UnsafePathError(BtrdeltaError):
    """A path that would leave the destination ('..', absolute, NUL, symlinked parent)."""

    exit_code = 4
    meaning = "unsafe path in the input"


class MissingBaseError(BtrdeltaError):
    """A parent subvolume, delta base file or chunk that is needed but not present."""

    exit_code = 6
    meaning = "missing parent subvolume, delta base or chunk"


class MissingParentError(MissingBaseError):
    """The parent subvolume ``uuid`` of an incremental stream is not where a receive looks
    (``where``)."""

    def __init__(self, uuid: object, where: object, *, path: bytes | str | None = None) -> None:
        super().__init__(f"cannot find parent subvolume {uuid} in {where}: this is an "
                         "incremental stream; receive its parent there first", path=path)
        self.uuid = str(uuid)


class ApplyError(BtrdeltaError):
    """An operating-system error while applying a record, with the operation and path."""

    exit_code = 8
    meaning = "I/O error while applying; no space left (ENOSPC, EDQUOT, EFBIG) in any command"

    def __init__(self, message: str, *, op: str | None = None, **where: object) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.op = op


class TransportError(BtrdeltaError):
    """An HTTP or network failure."""

    exit_code = 7
    meaning = "transport (HTTP) error"

    def __init__(
        self, message: str, *, url: str | None = None, status: int | None = None, **where: object
    ) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.url = url
        self.status = status

    def __str__(self) -> str:
        base = super().__str__()
        if self.url and self.url not in base:
            base = f"{self.url}: {base}"
        return base


class ProtocolError(BtrdeltaError):
    """A sender/receiver negotiation went wrong."""

    exit_code = 9
    meaning = "replication protocol error"


class MissingDependencyError(BtrdeltaError):
    """The work needs an optional dependency that is not installed (``btrdelta._optional``):
    the message names the package and the extra that brings it."""

    exit_code = 10
    meaning = "an optional dependency is not installed (pip install 'btrdelta[EXTRA]')"

    def __init__(self, package: str, extra: str, *, what: str = "") -> None:
        spec = f"btrdelta[{extra}]" if extra else "btrdelta"
        super().__init__(f"{what}needs the optional dependency {package}: "
                         f"pip install '{spec}'")
        self.package = package
        self.extra = extra


class UsageError(BtrdeltaError):
    """Arguments that cannot work together (found after parsing: ``-f X`` and a positional
    input, ``--json`` while the payload goes to standard output)."""

    exit_code = EXIT_USAGE
    meaning = "usage error"


def exit_codes() -> list[tuple[int, str]]:
    """Every exit code of the ``btrdelta`` command with its meaning, sorted (the tables of
    ``--help`` and the README are generated from this)."""
    codes = {EXIT_OK: "success", EXIT_USAGE: "usage error",
             EXIT_HANGUP: "hung up (SIGHUP)", EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGINT)",
             EXIT_TERMINATED: "terminated (SIGTERM)"}
    todo: list[type[BtrdeltaError]] = [BtrdeltaError]
    while todo:
        cls = todo.pop(0)
        if "meaning" in cls.__dict__:
            codes.setdefault(cls.exit_code, cls.meaning)
        todo += cls.__subclasses__()
    return sorted(codes.items())
