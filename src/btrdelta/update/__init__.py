"""Workflows above the engines (floor 4): identify any input, receive any input, clone an
image, update from a versions repository, replicate.

A workflow first plans (pure functions over indexes and holdings), then executes through
the engines (``stream``, ``receive``, ``send``, ``delta``, ``chunk``). Nothing here parses
arguments or prints: that is ``btrdelta.cli``.
"""

from __future__ import annotations

__all__ = [  # the workflow modules (``btrdelta/__init__`` re-exports the main calls)
    "api", "clone", "identify", "image", "receive", "signed", "versions", "publish",
]
