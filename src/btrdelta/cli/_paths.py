"""Checks of the paths and URLs a command is given: a repository location without its
scheme, a ``file://`` URL read as its path, the arguments swapped, an output that is the
input, a directory inside the one it must stay apart from.
"""

from __future__ import annotations

import os

from ..errors import BtrdeltaError, UsageError

#: (compiled by the first check, in re's cache: ~1 M instructions of every start otherwise)
_HOST_PATH = r"(?:localhost|[\w-]+(?:\.[\w-]+)+|\[[0-9a-fA-F:]+\])(?::\d+)?(?:/.*)?"


def check_location(location: str, what: str = "URL") -> None:
    """A repository location (``URL``, ``--mirror``) that is no directory here and has no
    scheme but reads as ``host[:port]/path`` (``127.0.0.1:8000/app``, ``updates.example/app``)
    is a URL whose scheme was left out: a usage error naming the URL meant.

    A location that names one of the repository's files (``.../app/timestamp.json``, the
    ``index.html`` a browser shows) is a usage error naming the base URL meant (the client
    looked for ``.../timestamp.json/timestamp.json``: 'no signed repository here').

    Raises:
        UsageError: see above.
    """
    bare = location.split("?")[0].split("#")[0].rstrip("/")
    leaf = bare.rsplit("/", 1)[-1]
    if leaf in ("timestamp.json", "index.html") and "/" in bare \
            and not os.path.isdir(location):
        raise UsageError(f"{what} {location} names the repository's {leaf}: give the "
                         f"repository's base URL: {bare[:-len(leaf) - 1]}")
    if "://" in location or os.path.exists(location):
        return
    import re

    if re.fullmatch(_HOST_PATH, location):
        raise UsageError(f"{what} {location}: no such directory; a URL needs its scheme: "
                         f"http://{location} (or https://)")


def location(text: str) -> str:
    """An argument that is a path or an ``http(s)://`` URL (``type=`` of argparse): a
    ``file://`` URL is read as the path it names; any other ``scheme://`` is refused (it
    would otherwise be taken as a relative path, and a destination made under ``./ftp:``).

    Raises:
        argparse.ArgumentTypeError: see above.
    """
    import argparse
    import re

    if text.startswith(("http://", "https://")) or not re.match(r"[a-zA-Z][\w+.-]*://", text):
        return text
    from ..chunk.source import file_url_path

    if text.startswith("file://"):
        try:
            return file_url_path(text)
        except BtrdeltaError as e:
            raise argparse.ArgumentTypeError(f"{text}: {e.args[0]}") from None
    raise argparse.ArgumentTypeError(
        f"{text}: not a path or an http(s):// URL (file:// URLs are read as paths; "
        f"{text.split('://')[0]}:// is not supported here)")


def location_keeping_file_url(text: str) -> str:
    """:func:`location` for an argument where a ``file://`` URL of a directory means
    something else than its path (``device install FS file:///media/usb/os``: a
    repository; the path alone is a tree to install): checked, then kept as given."""
    path = location(text)
    return text if text.startswith("file://") else path


def check_not_url(path: str, what: str, hint: str) -> None:
    """``path`` (a local directory argument) given as a URL: the arguments swapped.

    Raises:
        UsageError: ``path`` has a scheme (``http://...``).
    """
    import re

    if re.match(r"[a-zA-Z][\w+.-]*://", path):
        raise UsageError(f"{what} {path} is a URL: {hint}")


def refuse_same_file(name: str, output: str | None, option: str = "-o") -> None:
    """The output named as the input file (``delta make -f X -o X``, ``image compress -i
    IMG -o IMG``): it would replace the input (outputs are written beside and renamed
    over), so a usage error instead.

    Raises:
        UsageError: ``output`` is the file ``name`` is.
    """
    if output in (None, "-") or name == "-":
        return
    try:
        same = os.path.samefile(name, output)
    except OSError:  # (either missing: said where it is opened)
        return
    if same:
        raise UsageError(f"{option} {output} is the input file: the output would replace it "
                         "(give it another name)")


def refuse_inside(inner: str, outer: str, words: str, *, mounts_apart: bool = False) -> None:
    """A directory argument that is another one or inside it where that mixes them up
    (``replicate SRC SRC/backup``, ``update REPO REPO``, ``repo add REPO V TREE`` with REPO
    in TREE): a usage error, ``words`` its text (``inner`` and ``outer`` are formatted in:
    ``{inner}``, ``{outer}``, ``{how}`` "is" or "is inside"). ``mounts_apart``: ``inner``
    below ``outer`` but on another filesystem (a mount point, a nested subvolume) is apart
    from it, as a send of ``outer`` leaves it out.

    Raises:
        UsageError: ``inner`` is ``outer`` or below it (symbolic links resolved).
    """
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    if a != b and not a.startswith(b.rstrip(os.sep) + os.sep):
        return
    if a != b and mounts_apart:
        near = a  # (the nearest part of it that exists)
        while not os.path.exists(near) and near != b:
            near = os.path.dirname(near)
        try:
            if os.stat(near).st_dev != os.stat(b).st_dev:
                return
        except OSError:
            pass
    how = "is" if a == b else "is inside"
    raise UsageError(words.format(inner=inner, outer=outer, how=how))
