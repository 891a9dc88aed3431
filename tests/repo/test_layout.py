"""The binary-carry delta layout: about two deltas per release, O(log N) hops."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.repo.layout import delta_sources, future_sources, hops_bound, lowbit

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
