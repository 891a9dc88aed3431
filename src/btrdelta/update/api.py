"""The public entry points, one call each: what ``import btrdelta`` offers.

Every function takes what it reads first (a stream, a delta, a tree), then the base that
input applies to or is compared with (``old``, ``parent``), then where the result goes
(``dest``, ``output``); options are keywords. An input is a path, ``"-"`` (standard input)
or a binary file; an output is a path (written whole or not at all: a temporary file in the
same directory, renamed into place on success), ``"-"`` (standard output) or a binary file.
Each function opens what it is given and calls one engine; the ``btrdelta`` command calls
the same functions.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from .receive import receive_any  # re-exported: btrdelta.receive_any

if TYPE_CHECKING:
    from ..delta.make import MakeStats
    from ..stream.writer import StreamWriter

__all__ = ["expand_delta", "make_delta", "reading", "receive_any", "send_tree", "tree_sum",
           "writing"]

#: an input or output: a path, "-" (standard input / output) or a binary file
Target = str | os.PathLike[str] | BinaryIO | IO[bytes]


def _name(target: Target) -> str | None:
    if isinstance(target, (str, os.PathLike)):
        return os.fspath(target)
    name = getattr(target, "name", None)
    return name if isinstance(name, str) else None


@contextlib.contextmanager
def reading(target: Target) -> Iterator[BinaryIO]:
    """A buffered binary file reading ``target`` (opened here when it is a path or ``-``)."""
    if not isinstance(target, (str, os.PathLike)):
        if isinstance(target, io.BufferedIOBase):
            yield target  # type: ignore[misc]
        else:
            yield io.BufferedReader(target, 1 << 20)  # type: ignore[type-var]
        return
    if os.fspath(target) == "-":
        yield sys.stdin.buffer
        return
    with open(target, "rb", buffering=1 << 20) as f:
        yield f


@contextlib.contextmanager
def writing(target: Target) -> Iterator[BinaryIO]:
    """A binary file writing ``target``: a path is replaced whole on success only."""
    if not isinstance(target, (str, os.PathLike)):
        yield target  # type: ignore[misc]
        return
    if os.fspath(target) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    from ..fs.atomic import atomic_output

    with atomic_output(target) as f:
        yield f


def make_delta(
    stream: Target, old: str | os.PathLike[str], output: Target, *,
    codec: str = "auto", max_file_size: int | None = None, jobs: int | None = None,
    level: int | None = None, recompress: bool = True, carrier: str = "auto",
    source: str | None = None, on_progress: Callable[[int, int], None] | None = None,
) -> MakeStats:
    """Make the delta stream of a btrfs send stream against its old snapshot.

    Args:
        stream: the btrfs send stream (e.g. ``btrfs send -p OLD NEW``).
        old: the stream's parent snapshot as a directory (the old file contents).
        output: where the delta stream goes.
        codec: patch codec (``"auto"``: the smallest per file).
        max_file_size, jobs, level, recompress, carrier: as ``btrdelta delta make --help``
            says (``carrier="auto"``: xz where much new file data is carried, else zstd;
            ``"xz"``: the smaller, slower to make and expand; ``"zstd"``: the faster).
        source: input name for error messages (default: the path).
        on_progress: called with (bytes read, bytes written) now and then.

    Returns:
        The statistics of what was made (sizes, patched files, bytes saved per codec).
    """
    from ..delta.make import make_delta as make
    from ..delta.options import MakeOptions

    if carrier not in ("auto", "zstd", "xz"):
        raise ValueError(f"carrier must be 'auto', 'zstd' or 'xz', not {carrier!r}")
    opts = MakeOptions(codec=codec, recompress=recompress, carrier=carrier)
    if max_file_size is not None:
        opts.max_file_size = max_file_size
    if jobs is not None:
        opts.jobs = jobs
    if level is not None:
        opts.level = level
    with reading(stream) as f, writing(output) as out:
        return make(f, old, out.write, opts, source=source or _name(stream),
                    on_progress=on_progress)


def expand_delta(
    delta: Target, old: str | os.PathLike[str], output: Target, *,
    max_file_size: int | None = None, source: str | None = None,
) -> int:
    """Expand a delta stream against its old snapshot into the btrfs send stream it was
    made from, byte for byte; returns the stream's size in bytes."""
    from ..delta.expand import expand_to, open_delta
    from ..delta.options import DEFAULT_MAX_FILE_SIZE

    name = source or _name(delta)
    with reading(delta) as f, writing(output) as out:
        return expand_to(open_delta(f, source=name), old, out.write,
                         max_file_size=max_file_size or DEFAULT_MAX_FILE_SIZE, source=name)


def send_tree(
    tree: str | os.PathLike[str], output: Target, *, parent: str | os.PathLike[str] | None = None,
    version: int = 1, **options: Any,
) -> StreamWriter:
    """Write a btrfs send stream that recreates ``tree`` (or turns ``parent`` into it) on
    any receiver, the kernel's ``btrfs receive`` included.

    ``options``: keyword options of :func:`btrdelta.send.send_records` (``compress``,
    ``quick``, ``workers``, ``name``, ``on_progress``). Returns the writer (its
    ``records`` and ``bytes_written``).
    """
    from ..send import send_stream

    with writing(output) as out:
        return send_stream(out.write, tree, parent, version=version, **options)


def tree_sum(tree: str | os.PathLike[str], **options: Any) -> str:
    """The checksum of a whole tree (content, types, modes, owners, xattrs, links, times):
    :func:`btrdelta.tree.tree_sum`."""
    from ..tree import tree_sum as sum_tree

    return sum_tree(tree, **options)
