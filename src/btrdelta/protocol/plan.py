"""Choosing what to send from what the receiver holds (pure: no I/O).

:func:`choose` looks at the sender's sendshots of one source (oldest first, each with the
stream UUID its receiver knows it by) and the receiver's holdings, and decides:

* ``resume``: the receiver has a partial transfer of the session the sender has in flight
  for it;
* ``already-current`` (a refusal): the receiver holds the sendshot of the source's current
  state;
* ``incremental`` from the newest sendshot whose stream UUID the receiver holds (as a
  subvolume's received UUID, or its own UUID);
* ``diverged`` (a refusal): the receiver also holds a subvolume of this source that is newer
  than that base and that the sender has no sendshot of (it was changed or replaced there);
* ``full`` when the receiver holds nothing of this source, else ``no-common-base`` (a
  refusal) unless a full is allowed.

A subvolume is "of this source" when its name is the stream name or starts with it and a
dot (the names ``replicate`` gives: ``NAME.<UTC time>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from .._value import Value
from .messages import Held, Partial

__all__ = ["Choice", "Known", "choose"]


class Known(Value):
    """One sendshot of the source, as planning needs it."""

    digest: str
    stream_uuid: UUID
    stream_ctransid: int


class Choice(Value):
    """The decision: a kind, the base, or a refusal's code and text."""

    kind: str
    base: Known | None = None
    code: str = ""
    message: str = ""


def _of_source(h: Held, name: str) -> bool:
    return h.name == name or h.name.startswith(name + ".")


def choose(
    known: Sequence[Known], held: Sequence[Held], *, name: str,
    partial: Partial | None = None, inflight_session: str | None = None,
    current: str | None = None, allow_full: bool = False,
) -> Choice:
    """What to send (see the module docstring).

    Args:
        known: the sender's sendshots of this source, oldest first.
        held: what the receiver holds.
        name: the stream name of the source (received subvolumes are ``name.*``).
        partial: the receiver's partial transfer, if any.
        inflight_session: the session the sender has in flight for this receiver.
        current: the digest of the sendshot that is the source's current state, if the
            sender knows the source has not changed since it.
        allow_full: send a full stream even when the receiver holds other states of this
            source (they stay; the new one is added).
    """
    if partial is not None and inflight_session is not None and \
            partial.session == inflight_session:
        return Choice("resume")
    ids = {h.received_uuid or h.uuid: h for h in held}
    ids.update({h.uuid: h for h in held})
    base = next((k for k in reversed(known) if k.stream_uuid in ids), None)
    if current is not None and base is not None and base.digest == current:
        return Choice("refuse", base, "already-current",
                      f"the receiver holds {ids[base.stream_uuid].name}, the current state")
    mine = [h for h in held if _of_source(h, name)]
    if base is not None:
        base_held = ids[base.stream_uuid]
        stranger = [h for h in mine if h.stransid > base_held.stransid
                    and (h.received_uuid or h.uuid) not in {k.stream_uuid for k in known}]
        if stranger:
            return Choice("refuse", base, "diverged",
                          f"the receiver holds {stranger[0].name}, newer than the base "
                          f"{base_held.name} and unknown here")
        return Choice("incremental", base)
    if mine and not allow_full:
        return Choice("refuse", None, "no-common-base",
                      f"the receiver holds {', '.join(h.name for h in mine[:3])} but no "
                      "state the sender has a sendshot of (replicate --full adds a full one "
                      "beside them)")
    return Choice("full")
