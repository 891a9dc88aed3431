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
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["delta_sources", "future_sources", "hops_bound", "lowbit"]


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
