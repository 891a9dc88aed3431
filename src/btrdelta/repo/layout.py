"""Which deltas a repository stores: the *binary-carry* layout (pure).

Versions are numbered by position, 1, 2, 3, … in the order they were added. Release ``p``
gets a delta from each of:

* ``p - lowbit(p)`` (``lowbit``: the largest power of two dividing ``p``), unless that is 0;
* ``p - 2**j`` for every ``j`` below the number of trailing zero bits of ``p``
  (``p - 1``, ``p - 2``, ``p - 4``, … while those are ``a`` with ``a + lowbit(a) = p``).

That is a Fenwick tree walked both ways: edges ``a -> a + lowbit(a)`` climb to ever larger
powers of two, edges ``b - lowbit(b) -> b`` descend from a power of two to any version.
Every ``p`` has ``p - 1`` among its sources (consecutive releases are always one hop), an
odd release has exactly one delta, and over all releases the mean is 2 (each ``a`` has one
outgoing climbing edge, each ``b`` one incoming descending edge). From any ``u`` to any
later ``w`` there is a path of at most ``2 * bit_length(w)`` hops: climb from ``u`` to the
number ``m`` that keeps ``w``'s bits above the first bit where ``u`` and ``w`` differ and sets
that bit, then descend from ``m`` to ``w`` adding ``w``'s lower bits one at a time.

The plain ``v-1, v-2, v-4, v-8, …`` layout needs ``log2(v)`` deltas for every release (10 at
version 1000) for the same O(log N) hops; this one needs 2 on average.

Every delta into ``p`` comes from an older release, so all of them are made when ``p`` is
added and never again: artifacts are immutable.

**Measured extras.** When every release rewrites the same bytes (a rebuilt shared library),
a delta costs about the same from any older release, so a path of two such hops costs
twice the direct delta. After the layout's deltas into ``p`` are made, :func:`next_trial`
looks at what the repository already knows (every stored delta's size) for an older ``u``
whose cheapest path to ``p`` costs more than ``ratio`` times the cheapest delta into ``p``
from a release at least as new as ``u`` (an estimate of the direct delta ``u -> p``: a
release is rarely closer to ``p`` than a newer one). The newest such ``u`` is tried: the
delta ``u -> p`` is made, and kept only if the path it replaces cost more than ``ratio``
times it. Extras are budgeted (:func:`extra_budget`) so that the layout's deltas plus the
extras never exceed 2.2 per release at any repository size, and the layout's own edges keep
the hop bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set

__all__ = [
    "delta_sources",
    "extra_budget",
    "future_sources",
    "hops_bound",
    "lowbit",
    "next_trial",
    "paths_to",
]


def lowbit(p: int) -> int:
    """The largest power of two dividing ``p`` (``p >= 1``)."""
    if p < 1:
        raise ValueError(f"version position {p} is not >= 1")
    return p & -p


def delta_sources(p: int) -> list[int]:
    """Positions of the releases release ``p`` gets a delta from, newest first."""
    low = lowbit(p)
    out = {p - (1 << j) for j in range(low.bit_length() - 1)}
    if p - low > 0:
        out.add(p - low)
    if p > 1:
        out.add(p - 1)
    return sorted(out, reverse=True)


def future_sources(added: int, positions: Iterable[int]) -> set[int]:
    """Which of ``positions`` a release added after ``added`` will still make a delta from.

    A publisher keeps only these trees at hand. Release ``a`` serves ``a + lowbit(a)``
    (climbing) and, descending, every ``a + 2**j`` with ``2**j < lowbit(a)``; so it is
    still needed while ``added < a + lowbit(a)``.
    """
    return {a for a in positions if a + lowbit(a) > added}


def hops_bound(w: int) -> int:
    """The most delta hops from any older release to ``w`` (see the module docstring)."""
    return 2 * w.bit_length()


def extra_budget(p: int) -> int:
    """How many measured extra deltas releases ``1 .. p`` may hold in all.

    The layout's deltas over ``N`` releases number ``2N - 1 - popcount(N) -
    floor(log2 N)`` (each ``q`` has ``1 + tz(q)`` sources, ``tz(q)`` for a power of two), so
    extras up to ``0.2 p + 2 + floor(log2 p)`` (non-decreasing in ``p``) keep the total at
    most ``2.2 N`` for every ``N >= p``.
    """
    return p // 5 + 1 + p.bit_length() if p >= 1 else 0


def paths_to(p: int, deltas: Sequence[Mapping[int, int]]) -> list[int]:
    """Bytes of the cheapest delta path from each release to ``p`` (index ``u``; ``-1``:
    no path). ``deltas[q - 1]`` maps each source of a delta into ``q`` to its bytes."""
    inf = 1 << 62
    dist = [inf] * (p + 1)
    dist[p] = 0
    for q in range(p, 1, -1):  # edges go forward: dist[q] is final when q is reached
        if dist[q] >= inf:
            continue
        for a, size in deltas[q - 1].items():
            if dist[q] + size < dist[a]:
                dist[a] = dist[q] + size
    return [-1 if d >= inf else d for d in dist]


def next_trial(p: int, deltas: Sequence[Mapping[int, int]], tried: Set[int], *,
               ratio: float = 1.2) -> int | None:
    """The older release whose direct delta into ``p`` is worth making now, or None (see
    the module docstring). ``tried``: sources already tried for ``p``."""
    dist = paths_to(p, deltas)
    into = deltas[p - 1]
    best_newer = 1 << 62  # cheapest delta into p from a release at least as new as u
    for u in range(p - 1, 0, -1):
        if u in into:
            best_newer = min(best_newer, into[u])
            continue
        if u not in tried and dist[u] > ratio * best_newer:
            return u
    return None
