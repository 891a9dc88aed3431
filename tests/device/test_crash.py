"""Crash-point tests: an install killed (SIGKILL) after every record of a small real update,
after random records of the whole minbase update, and at every step after the receive. After
each: the active root is unchanged (tree-sum), no half-made root is selectable, the re-run
gives the new root."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from btrdelta import device

from .conftest import Release
from .crash import check_after_crash, crash_install, rerun_and_reset

pytestmark = pytest.mark.btrfs
STEPS = ("receive", "place", "commit", "hook", "done")


def test_kill_after_every_record_of_a_small_update(btrfs_dev: Path,
                                                   small_release: Release) -> None:
    r = small_release
    device.init(btrfs_dev, r.old, state=[])
    k = 0
    while crash_install(btrfs_dev, r.delta, after=k):
        check_after_crash(btrfs_dev, r.old_sum, r.new_sum)
        rerun_and_reset(btrfs_dev, r.delta, r.new_sum)
        k += 1
    assert k == r.records > 50, (k, r.records)  # every record of the update was a crash point
    for step in STEPS:
        assert crash_install(btrfs_dev, r.delta, step=step)
        check_after_crash(btrfs_dev, r.old_sum, r.new_sum)
        rerun_and_reset(btrfs_dev, r.delta, r.new_sum)


def test_kill_at_random_records_of_the_debian_update(btrfs_dev: Path,
                                                     debian_release: Release) -> None:
    r = debian_release
    device.init(btrfs_dev, r.full, state=[])
    rng = random.Random(16)
    points = sorted(rng.sample(range(1, min(4000, r.records)), 2))
    for k in points:
        assert crash_install(btrfs_dev, r.delta, after=k), k
        check_after_crash(btrfs_dev, r.old_sum, r.new_sum)
        rerun_and_reset(btrfs_dev, r.delta, r.new_sum)
