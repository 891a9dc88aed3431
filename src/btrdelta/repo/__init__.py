"""A versions repository on dumb mirrors (floor 3): the layout of deltas, the signed index,
its freshness checks, and the cheapest-path planner, all pure; and mirror access.

Publishing (``repo add``/``sign``) and updating (``btrdelta update``) execute through the
engines in :mod:`btrdelta.update`. The format is ``docs/formats/repository.md``.
"""

from __future__ import annotations

__all__: list[str] = []
