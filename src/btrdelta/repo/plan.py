"""The cheapest way by bytes from what a device holds to a wanted version (pure).

Every edge the index offers is considered: a delta from an older version (its size), and the
full of any version from nothing (its size: the plain full, or, for the versions the caller
priced with the chunks it already holds, that smaller figure). Deltas only go from older to
newer positions, so the graph is acyclic in position order and one pass over positions
``1 .. target`` finds the cheapest path (ties: fewer hops, then the newest start) in time
linear in versions + deltas: a 1,000-version index plans in about a millisecond.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from .._value import Value, field
from ..errors import MissingBaseError
from .model import Index

__all__ = ["Plan", "Step", "plan_update"]


class Step(Value, frozen=True):
    """One hop: ``kind`` is ``"full"`` (``source`` None) or ``"delta"``."""

    kind: str
    source: int | None
    target: int
    bytes: int


class Plan(Value):
    """What an update will download and apply, and what it costs."""

    target: int
    #: the held version the path starts from (None: from nothing, or nothing to do)
    start: int | None
    steps: list[Step] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Artifact bytes to download (before anything already downloaded is subtracted)."""
        return sum(s.bytes for s in self.steps)

    @property
    def hops(self) -> int:
        """Artifacts applied one after the other."""
        return len(self.steps)

    def to_json(self, names: list[str]) -> dict[str, Any]:
        """A JSON-able description (version names instead of positions)."""

        def name(p: int | None) -> str | None:
            return None if p is None else names[p - 1]

        return {
            "target": name(self.target),
            "start": name(self.start),
            "bytes": self.bytes,
            "hops": self.hops,
            "steps": [
                {"kind": s.kind, "from": name(s.source), "to": name(s.target), "bytes": s.bytes}
                for s in self.steps
            ],
        }


def plan_update(
    index: Index,
    held: Set[int],
    target: int,
    *,
    full_cost: Mapping[int, int] | None = None,
    skip: Set[tuple[int | None, int]] = frozenset(),
) -> Plan:
    """The cheapest path to version ``target`` (a 1-based position).

    Args:
        index: the verified index.
        held: positions the device holds (verified copies).
        target: the wanted position.
        full_cost: bytes of the full of some versions given what the device holds (the
            rest cost their plain full, ``IndexVersion.full_bytes``).
        skip: edges ``(source, target)`` not to use (``source`` None: a full), e.g. ones
            that failed.

    Raises:
        MissingBaseError: no edge reaches the target.
    """
    n = len(index.versions)
    if not 1 <= target <= n:
        raise MissingBaseError(f"version position {target} is not in the index (1..{n})")
    if target in held:
        return Plan(target, target)
    full_cost = full_cost or {}
    inf = (1 << 62, 0)
    # best[p] = (bytes, hops, -start); pred[p] = (kind, source)
    best: list[tuple[int, int, int]] = [(inf[0], 0, 0)] * (target + 1)
    pred: list[tuple[str, int | None]] = [("", None)] * (target + 1)
    for p in range(1, target + 1):
        if p in held:
            best[p], pred[p] = (0, 0, -p), ("held", p)
            continue
        if (None, p) not in skip:
            cost = full_cost.get(p, index.versions[p - 1].full_bytes)
            best[p], pred[p] = (cost, 1, 0), ("full", None)
        for a, size in index.versions[p - 1].deltas:
            if (a, p) in skip or best[a][0] >= inf[0]:
                continue
            cand = (best[a][0] + size, best[a][1] + 1, best[a][2])
            if cand < best[p]:
                best[p], pred[p] = cand, ("delta", a)
    if best[target][0] >= inf[0]:
        raise MissingBaseError(f"no way to version {index.versions[target - 1].name!r}: "
                               "every edge to it was excluded")
    steps: list[Step] = []
    p = target
    while pred[p][0] in ("delta", "full"):
        kind, source = pred[p]
        cost = best[p][0] - (best[source][0] if source is not None else 0)
        steps.append(Step(kind, source, p, cost))
        if source is None:
            break
        p = source
    steps.reverse()
    start = steps[0].source if steps else None
    return Plan(target, start, steps)
