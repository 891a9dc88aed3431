"""Signed metadata files: ``{"signed": …, "signatures": […]}`` (pure).

The signature envelopes are :class:`btrdelta.trust.Signature` objects over the BLAKE3-256
digest of the canonical encoding of ``signed`` (:func:`.canonical.canonical`), with a
context that names the document's role (``btrdelta-index``, ``btrdelta-timestamp``), so a
timestamp signature never passes for an index one. A document verifies when at least one
signature by a trusted key covers it; signatures by other keys are ignored (a publisher may
add keys before clients know them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import blake3

from .. import trust
from ..errors import SignatureError
from .canonical import Fields, canonical, parse_json

__all__ = [
    "CONTEXT_INDEX",
    "CONTEXT_TIMESTAMP",
    "open_document",
    "sign_document",
]

CONTEXT_INDEX = "btrdelta-index"
CONTEXT_TIMESTAMP = "btrdelta-timestamp"


def _digest(signed: Any, *, parsed: bool = False) -> trust.ContentDigest:
    payload = canonical(signed, parsed=parsed)
    return trust.ContentDigest(trust.DIGEST_BLAKE3, blake3.blake3(payload).digest(),
                               len(payload))


def sign_document(signed: Any, keys: Sequence[trust.PrivateKey], context: str) -> bytes:
    """The file bytes of ``signed`` with one signature per key (keys sorted by id)."""
    content = _digest(signed)
    sigs = [trust.sign(k, content, context).to_json()
            for k in sorted(keys, key=trust.key_id)]
    text = json.dumps({"signed": signed, "signatures": sigs}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


def open_document(
    data: bytes, source: str, keys: Sequence[trust.PublicKey], context: str
) -> Any:
    """The ``signed`` object of a document that one of ``keys`` signed for ``context``.

    Raises:
        StreamFormatError: not a signed document.
        SignatureError: no signature by a trusted key covers it.
    """
    f = Fields(parse_json(data, source), source)
    signed = f.get("signed")
    sigs = f.array("signatures", 64)
    content = _digest(signed, parsed=True)
    trusted = {trust.key_id(k) for k in keys}
    problems: list[str] = []
    for i, obj in enumerate(sigs):
        try:
            sig = trust.Signature.from_json(obj, source=f"{source}: signatures[{i}]")
        except SignatureError as exc:  # (its place once: SOURCE is named when raised)
            problems.append(str(exc).removeprefix(f"{source}: "))
            continue
        if sig.key_id not in trusted:
            continue
        try:
            trust.verify(sig, keys, content, context, source=source)
            return signed
        except SignatureError as exc:
            problems.append(exc.message)
    if problems:
        raise SignatureError(problems[0], source=source)
    known = ", ".join(sorted(k[:16] for k in trusted)) or "none"
    raise SignatureError(f"not signed by a trusted key (trusted: {known})", source=source)
