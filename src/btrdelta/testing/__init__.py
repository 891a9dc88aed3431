"""Test, demo and benchmark helpers that drive the real kernel (loop filesystems, scenarios)."""

from __future__ import annotations

__all__ = ["loopfs", "scenarios", "tarballs", "vm", "wheels"]  # modules
