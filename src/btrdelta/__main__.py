"""``python -m btrdelta``."""

import gc

# btrdelta.cli.entry()'s collector setting (its _GC_YOUNG), from before the CLI's own imports
gc.set_threshold(20_000, *gc.get_threshold()[1:])

from .cli import entry  # noqa: E402

entry()
