"""Root key rotation: the chain of root documents ``root/<N>.json`` (TUF's root rotation).

A client starts from the root key it was given (``--key``, pinned): that is the trusted
root, version "pinned" (the key the repository began with is implicitly version 1). A
rotation publishes ``root/<N>.json`` (N = 2, 3, …; immutable), whose ``signed`` part lists
the new root keys and which is signed both by a key of root ``N - 1`` (the old root vouches
for the new one) and by a key it lists (the new key is held by whoever rotated). Before
verifying the index, :func:`current_root` walks the chain from the client's trusted root:
``root/<n+1>.json`` is fetched (every mirror in turn), checked, and becomes the trusted root,
until a version no mirror has. The newest root is kept (``state``), so a client never goes
back to a rotated-out key, and the index must then be signed by a key of the newest root.

A client that holds only a pinned key (no chain walked yet) skips documents its key did not
sign: a device shipped with the key of root 3 reads ``root/2.json`` (signed by the keys of
roots 1 and 2) and moves on to ``root/3.json`` (signed by root 3's own key, which it
trusts). Once it has advanced, a document that does not check is refused (exit 5).

The publisher side (:func:`make_root`, :func:`latest_root`) is used by ``repo sign
--previous-key`` (:mod:`btrdelta.update.sign`). Formats: ``docs/formats/repository.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import trust
from .._value import Value
from ..errors import SignatureError, StreamFormatError, TransportError
from ..fs.atomic import write_atomic
from .canonical import Fields, parse_json
from .mirror import Mirrors
from .model import SPEC_VERSION
from .signing import open_document, sign_document

__all__ = ["CONTEXT_ROOT", "Root", "current_root", "latest_root", "make_root"]

CONTEXT_ROOT = "btrdelta-root"
_MAX_ROOT = 64 << 10
_MAX_KEYS = 16
_NAME = re.compile(r"(\d+)\.json")


class Root(Value, frozen=True):
    """A trusted root: its version (0: a pinned key, no document) and its keys."""

    version: int
    keys: tuple[str, ...]

    def public_keys(self, source: str) -> list[trust.PublicKey]:
        return [trust.parse_public_key(k.encode(), source=source) for k in self.keys]

    def encode(self) -> dict[str, Any]:
        return {"type": "btrdelta-root", "spec": SPEC_VERSION, "version": self.version,
                "keys": list(self.keys)}

    @classmethod
    def decode(cls, obj: Any, source: str) -> Root:
        f = Fields(obj, source)
        f.expect("type", "btrdelta-root")
        f.expect("spec", SPEC_VERSION)
        keys = tuple(str(k) for k in f.array("keys", _MAX_KEYS))
        if not keys:
            f.fail("lists no key", "keys")
        root = cls(f.integer("version", 2), keys)
        root.public_keys(source)  # each key parses
        return root


def make_root(version: int, new_keys: Sequence[trust.PrivateKey],
              previous_keys: Sequence[trust.PrivateKey]) -> bytes:
    """The bytes of ``root/<version>.json`` listing ``new_keys``, signed by them and by
    ``previous_keys`` (the root it replaces)."""
    root = Root(version, tuple(trust.public_key_text(k) for k in new_keys))
    return sign_document(root.encode(), [*previous_keys, *new_keys], CONTEXT_ROOT)


def latest_root(repo_root: Path) -> Root | None:
    """The newest root document a repository holds (the publisher's view), or None."""
    found = sorted((int(m.group(1)), p) for p in (repo_root / "root").glob("*.json")
                   if (m := _NAME.fullmatch(p.name)))
    if not found:
        return None
    version, path = found[-1]
    root = Root.decode(Fields(parse_json(path.read_bytes(), str(path)), str(path)).get("signed"),
                       str(path))
    if root.version != version:
        raise StreamFormatError(f"says version {root.version}", source=str(path))
    return root


def _read_state(state: Path | None) -> Root | None:
    if state is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        return Root.decode(parse_json(state.read_bytes(), str(state)), str(state))
    return None


def _check(data: bytes, source: str, version: int, current: list[trust.PublicKey],
           advanced: bool) -> Root | None:
    """The root in ``data`` if it checks; None if a pinned-only client should skip it."""
    try:
        open_document(data, source, current, CONTEXT_ROOT)
    except SignatureError:
        if advanced:
            raise
        return None
    root = Root.decode(Fields(parse_json(data, source), source).get("signed"), source)
    if root.version != version:
        raise StreamFormatError(f"says version {root.version}", source=source)
    open_document(data, source, root.public_keys(source), CONTEXT_ROOT)  # the new key signed
    return root


def _fetch_check(mirrors: Mirrors, path: str, version: int, current: list[trust.PublicKey],
                 advanced: bool, url: str) -> Root | None:
    data = mirrors.get(url, path, _MAX_ROOT)
    try:
        open_document(data, path, [], CONTEXT_ROOT)
    except SignatureError:
        pass  # a signed document: checked below
    except StreamFormatError as exc:
        # no signed document at all (a captive portal's page, a host's page for a file it
        # lacks): as a 404, the chain ends here unless another mirror has the document
        # (the index must still verify with the keys of the chain so far)
        raise TransportError(f"{path}: no root document ({exc.message})",
                             url=f"{url}/{path}") from None
    return _check(data, path, version, current, advanced)


def current_root(mirrors: Mirrors, pinned: Sequence[trust.PublicKey],
                 state: Path | None, *, save: bool = True) -> list[trust.PublicKey]:
    """The keys of the newest root reachable from ``pinned`` (or from the root saved in
    ``state``), saving it there (unless not ``save``: a dry run); see the module docstring.

    Raises:
        SignatureError: after the chain advanced, a root document no trusted key signed.
        StreamFormatError: a malformed root document.
    """
    saved = _read_state(state)
    keys = list(pinned) if saved is None else saved.public_keys(str(state))
    version, advanced = (1, False) if saved is None else (saved.version, True)
    while True:
        version += 1
        path = f"root/{version}.json"

        try:
            root = mirrors.each(path, functools.partial(_fetch_check, mirrors, path, version,
                                                        keys, advanced))
        except TransportError:  # no mirror has it: the chain ends here
            return keys
        if root is None:
            continue
        keys, advanced = root.public_keys(path), True
        if state is not None and save:
            state.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(state, (json.dumps(root.encode(), sort_keys=True) + "\n").encode())
