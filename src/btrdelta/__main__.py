"""``python -m btrdelta``, and the ``btrdelta`` console script (``btrdelta.__main__:entry``)."""

import gc
import sys

#: the commands whose memory is put in transparent huge pages before the CLI's imports
#: (:func:`btrdelta._malloc.huge_pages`): a small ``send --from-sendshot`` is mostly its
#: start-up, ~2,000 of its page faults fewer (~3.5 ms of ~45 of CPU)
_HUGE_PAGES = frozenset({"send"})
#: the commands whose large buffers are each an ``mmap`` of its own from the start
#: (:func:`btrdelta._malloc.return_freed_memory`, which the command sets again): set only
#: after the imports, glibc's moving threshold had already left a heap whose peak was
#: ~10 MiB higher when the modules' byte code was read from ``.pyc`` files (12 MiB file:
#: 107 against 97 MiB; tests/delta/test_make_memory.py's goal is 112)
_RETURN_FREED = frozenset({("delta", "make")})


def entry() -> None:
    """:func:`btrdelta.cli.entry` with its collector setting (``_GC_YOUNG``) made before the
    CLI's imports: the thousands of objects they make are not gone over 700 allocations at
    a time (``python -m btrdelta send`` made 7 such collections, ~1.3 ms). ``import
    btrdelta`` imports nothing, so this runs first on both paths. So does the choice of
    huge pages (:data:`_HUGE_PAGES`), by the command word as the CLI finds it (the first
    word that is not an option), and of a fixed mmap threshold (:data:`_RETURN_FREED`,
    by the first two). A ``send --from-sendshot`` has its base record read ahead
    meanwhile (:func:`_read_ahead`)."""
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    words = tuple(w for w in sys.argv[1:] if not w.startswith("-"))
    if words[:1] and words[0] in _HUGE_PAGES:
        from ._malloc import huge_pages

        huge_pages()
    elif words[:2] in _RETURN_FREED:
        from ._malloc import return_freed_memory

        return_freed_memory()
    try:
        if words[:1] == ("send",) and any(
                w == "--from-sendshot" or w.startswith("--from-sendshot=") for w in sys.argv):
            _read_ahead(sys.argv)
        from .cli import entry as run

        run()
    except KeyboardInterrupt:
        # Ctrl-C while the CLI's modules load or the words are parsed, before the command
        # runs (under load the first ~0.2 s): nothing was made; it printed a traceback
        print("btrdelta: interrupted", file=sys.stderr)
        sys.exit(130)


def _read_ahead(argv: list[str]) -> None:
    """``send --from-sendshot``: its base record read, inflated and hashed by a thread
    while the CLI's modules are imported (:mod:`btrdelta.tree.early`), from the store of
    ``--store`` (as the words give it: the parser checks them later), else the default."""
    import os

    # (the CLI's package first: its ``_lean`` imports ``uuid`` without ``platform``, which
    # the stream package's import of ``uuid`` would import: ~5 ms)
    from . import cli  # noqa: F401
    from ._defaults import DEFAULT_STORE
    from ._malloc import keep_freed_memory, one_arena
    from .tree.early import RECORDS, start

    try:
        from .stream._speedups import mallopt
    except ImportError:
        return  # (ctypes' mallopt would cost more than is read ahead)
    # the record inflated in the heap (its huge pages), as by the send itself (send_cmd)
    keep_freed_memory(trim=8 << 20, mallopt=mallopt)
    one_arena(mallopt)
    store = DEFAULT_STORE
    for i, w in enumerate(argv):
        if w == "--":
            break
        if w == "--store" and i + 1 < len(argv):
            store = argv[i + 1]
        elif w.startswith("--store="):
            store = w.partition("=")[2]
    start(os.path.join(store, RECORDS))


if __name__ == "__main__":
    entry()
