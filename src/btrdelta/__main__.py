"""``python -m btrdelta``, and the ``btrdelta`` console script (``btrdelta.__main__:entry``)."""

import gc


def entry() -> None:
    """:func:`btrdelta.cli.entry` with its collector setting (``_GC_YOUNG``) made before the
    CLI's imports: the thousands of objects they make are not gone over 700 allocations at
    a time (``python -m btrdelta send`` made 7 such collections, ~1.3 ms). ``import
    btrdelta`` imports nothing, so this runs first on both paths."""
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    try:
        from .cli import entry as run

        run()
    except KeyboardInterrupt:
        # Ctrl-C while the CLI's modules load or the words are parsed, before the command
        # runs (under load the first ~0.2 s): nothing was made; it printed a traceback
        import sys

        print("btrdelta: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry()
