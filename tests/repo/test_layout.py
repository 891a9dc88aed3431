"""The binary-carry delta layout: about two deltas per release, O(log N) hops."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.repo.layout import (
    delta_sources,
    extra_budget,
    future_sources,
    hops_bound,
    lowbit,
    next_trial,
    paths_to,
)

N = 1024


def _hops_from(u: int, n: int) -> dict[int, int]:
    succ: dict[int, list[int]] = {}
    for p in range(2, n + 1):
        for a in delta_sources(p):
            succ.setdefault(a, []).append(p)
    dist = {u: 0}
    queue = deque([u])
    while queue:
        x = queue.popleft()
        for y in succ.get(x, ()):
            if y not in dist:
                dist[y] = dist[x] + 1
                queue.append(y)
    return dist


def test_small_layout_by_hand() -> None:
    assert [delta_sources(p) for p in range(1, 9)] == [
        [], [1], [2], [3, 2], [4], [5, 4], [6], [7, 6, 4],
    ]
    assert delta_sources(12) == [11, 10, 8]
    assert lowbit(12) == 4
    with pytest.raises(ValueError, match="not >= 1"):
        lowbit(0)


def test_mean_deltas_per_release_at_most_two() -> None:
    for n in (8, 100, 1000, 4096):
        total = sum(len(delta_sources(p)) for p in range(1, n + 1))
        assert total / n <= 2.0, n


@given(st.integers(1, N - 1), st.integers(2, N))
def test_any_older_version_reaches_any_newer_in_log_hops(u: int, w: int) -> None:
    if u >= w:
        u, w = w - 1, w
    hops = _hops_from(u, w)[w]
    assert hops <= hops_bound(w)
    assert delta_sources(w)[0] == w - 1  # consecutive releases are one hop


def test_every_source_is_older_and_consecutive_always_present() -> None:
    for p in range(2, 600):
        srcs = delta_sources(p)
        assert p - 1 in srcs
        assert all(1 <= a < p for a in srcs)
        assert srcs == sorted(set(srcs), reverse=True)


def test_future_sources_is_exactly_what_later_releases_use() -> None:
    for added in range(1, 300):
        later = {a for p in range(added + 1, 2 * added + 2) for a in delta_sources(p)}
        assert future_sources(added, range(1, added + 1)) == {a for a in later if a <= added}
        # a publisher keeps O(log N) trees
        assert len(future_sources(added, range(1, added + 1))) <= added.bit_length() + 1


#: bytes of ``delta make`` from release u to release w of the eight regex releases of
#: benchmarks/bench_repo.py (row w = 2..8, column u = 1..w-1), measured on this machine:
#: each release rebuilds a 2.5 MB library, so a delta costs about as much from any older one
REGEX_DELTAS = (
    (1308,),
    (11577, 11262),
    (127800, 127499, 125426),
    (175213, 175008, 175051, 168936),
    (216434, 216216, 216397, 205191, 46846),
    (220049, 219843, 220115, 214767, 153000, 109938),
    (503687, 503604, 502483, 501311, 500020, 471673, 471379),
)


def _publish(n: int, direct: Callable[[int, int], int]) -> tuple[list[dict[int, int]], int]:
    """What ``repo add`` keeps (the layout, then measured extras as ``update.jobs`` tries
    them: three trials at most); returns the deltas into each release and the trials."""
    deltas: list[dict[int, int]] = []
    trials = extras = 0
    for p in range(1, n + 1):
        deltas.append({a: direct(a, p) for a in delta_sources(p)})
        tried: set[int] = set()
        while len(tried) < 3 and extras < extra_budget(p):
            u = next_trial(p, deltas, tried)
            if u is None:
                break
            tried.add(u)
            trials += 1
            if paths_to(p, deltas)[u] > 1.2 * direct(u, p):
                deltas[-1][u] = direct(u, p)
                extras += 1
    return deltas, trials


def test_measured_extras_meet_the_ratio_on_the_regex_releases() -> None:
    deltas, trials = _publish(8, lambda u, w: REGEX_DELTAS[w - 2][u - 1])
    assert sum(len(d) for d in deltas) == 15  # 11 of the layout + 4 measured: 1.875/release
    assert sorted(deltas[7]) == [3, 4, 6, 7]
    assert trials == 8  # deltas made to find them
    for w in range(2, 9):  # every pair, not only to the newest
        dist = paths_to(w, deltas)
        for u in range(1, w):
            assert dist[u] <= 1.2 * REGEX_DELTAS[w - 2][u - 1], (u, w)
    # the layout alone: r1..r3 -> r8 cost 1.25x the direct delta
    plain = [{a: REGEX_DELTAS[p - 2][a - 1] for a in delta_sources(p)} for p in range(1, 9)]
    assert paths_to(8, plain)[1] > 1.24 * REGEX_DELTAS[6][0]


def test_extras_are_not_kept_where_a_chain_costs_what_a_direct_delta_does() -> None:
    """Independent changes per release: the path through newer releases is the direct
    delta's size, so every trial is dropped."""
    deltas, trials = _publish(200, lambda u, w: 1000 * (w - u))
    assert all(sorted(d) == sorted(delta_sources(p)) for p, d in enumerate(deltas, 1))
    assert trials <= 3 * 200


def test_extras_never_take_the_mean_over_2_2() -> None:
    """A rebuilt library (a delta costs the same from anywhere): extras are spent up to
    the budget, and at no size does the total pass 2.2 deltas per release."""
    deltas, _ = _publish(300, lambda u, w: 1000 + w - u)
    for n in range(1, 301):
        assert sum(len(d) for d in deltas[:n]) <= 2.2 * n, n
    assert sum(len(d) for d in deltas) > sum(len(delta_sources(p)) for p in range(1, 301))
    total = 0
    for n in range(1, 5000):  # the budget's bound, whatever the extras
        total += len(delta_sources(n))
        assert total == 2 * n - 1 - bin(n).count("1") - (n.bit_length() - 1)
        assert total + extra_budget(n) <= 2.2 * n, n
