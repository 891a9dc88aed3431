"""``python -m btrdelta``."""

from .cli import entry

entry()
