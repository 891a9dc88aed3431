"""Test, demo and benchmark helpers that drive the real kernel (loop filesystems, scenarios)."""
