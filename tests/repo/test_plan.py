"""The cheapest-path planner against brute force over every path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btrdelta.errors import MissingBaseError
from btrdelta.repo.layout import delta_sources
from btrdelta.repo.model import Index, IndexVersion
from btrdelta.repo.plan import plan_update


def _index(fulls: list[int], sizes: dict[tuple[int, int], int]) -> Index:
    versions = []
    for p, full in enumerate(fulls, 1):
        deltas = tuple((a, sizes[(a, p)]) for a in delta_sources(p) if (a, p) in sizes)
        versions.append(IndexVersion(f"v{p}", full, deltas))
    return Index(1, 0, ("A" * 43 + "=",), tuple(versions), ())


def _brute(index: Index, held: set[int], target: int, full_cost: dict[int, int]) -> int:
    best = {h: 0 for h in held if h <= target}
    for p in range(1, target + 1):
        cands = [full_cost.get(p, index.versions[p - 1].full_bytes)]
        cands += [best[a] + n for a, n in index.versions[p - 1].deltas if a in best]
        if p in held:
            cands.append(0)
        best[p] = min(cands)
    return best[target]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Index, set[int], int, dict[int, int]]:
    n = draw(st.integers(1, 40))
    fulls = [draw(st.integers(1000, 5000)) for _ in range(n)]
    sizes = {}
    for p in range(1, n + 1):
        for a in delta_sources(p):
            if draw(st.booleans()) or a == p - 1:
                sizes[(a, p)] = draw(st.integers(1, 3000))
    held = set(draw(st.lists(st.integers(1, n), max_size=3)))
    target = draw(st.integers(1, n))
    full_cost = {target: draw(st.integers(0, fulls[target - 1]))} if draw(st.booleans()) else {}
    return _index(fulls, sizes), held, target, full_cost


@given(scenarios())
def test_plan_is_cheapest_and_consistent(case: tuple[Index, set[int], int, dict[int, int]]) -> None:
    index, held, target, full_cost = case
    plan = plan_update(index, held, target, full_cost=full_cost)
    assert plan.bytes == _brute(index, held, target, full_cost)
    if target in held:
        assert plan.steps == []
        return
    # the steps chain from a held version (or a full) to the target
    first = plan.steps[0]
    assert (first.kind == "full" and first.source is None) or first.source in held
    for a, b in zip(plan.steps, plan.steps[1:], strict=False):
        assert b.kind == "delta"
        assert b.source == a.target
    assert plan.steps[-1].target == target
    for s in plan.steps:
        if s.kind == "delta":
            assert (s.source, s.bytes) in index.versions[s.target - 1].deltas


def test_ties_prefer_fewer_hops_and_skip_excludes_edges() -> None:
    # 1 -> 2 -> 4 costs 10 + 10; 1 -> 2 -> 3 -> 4 costs 10 + 5 + 5
    index = _index([100, 100, 100, 100], {(1, 2): 10, (2, 3): 5, (3, 4): 5, (2, 4): 10})
    plan = plan_update(index, {1}, 4)
    assert [(s.source, s.target) for s in plan.steps] == [(1, 2), (2, 4)]
    assert (plan.bytes, plan.hops, plan.start) == (20, 2, 1)
    plan = plan_update(index, {1}, 4, skip={(2, 4)})
    assert [(s.source, s.target) for s in plan.steps] == [(1, 2), (2, 3), (3, 4)]
    plan = plan_update(index, set(), 4)
    assert [(s.kind, s.target) for s in plan.steps] == [("full", 4)]
    assert plan.to_json(["a", "b", "c", "d"])["steps"] == [
        {"kind": "full", "from": None, "to": "d", "bytes": 100}]
    with pytest.raises(MissingBaseError):
        plan_update(index, set(), 4, skip={(None, 4), (3, 4), (2, 4)})
    with pytest.raises(MissingBaseError):
        plan_update(index, set(), 5)


def test_a_newer_held_version_only_helps_through_the_full() -> None:
    index = _index([100, 100, 100], {(1, 2): 10, (2, 3): 10})
    plan = plan_update(index, {3}, 2, full_cost={2: 40})
    assert [(s.kind, s.bytes) for s in plan.steps] == [("full", 40)]
