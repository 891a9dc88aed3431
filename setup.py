"""Build hook for the optional C accelerators; all metadata lives in pyproject.toml.

``btrdelta.stream._speedups``, ``btrdelta.receive._fastapply``, ``btrdelta.delta._unfold``,
``btrdelta.chunk._buzhash``, ``btrdelta.tree._treewalk``, ``btrdelta.tree._columns``,
``btrdelta.send._blockhash``, ``btrdelta.fs._sweep``, ``btrdelta.send._cells`` and
``btrdelta._hugepages`` (not an accelerator: a ``send`` process's memory in huge pages,
see ``btrdelta._malloc``) are optional: without a C compiler or Python headers (or, for
``_blockhash``, ``xxhash.h``: Debian's libxxhash-dev) the build skips them and btrdelta
runs on its pure-Python code paths. They include ``src/btrdelta/_constants.h``, generated
from the Python tables by ``scripts/gen_constants.py``.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]
_SHARED = {"include_dirs": ["src/btrdelta"], "depends": ["src/btrdelta/_constants.h"],
           "optional": True}

setup(
    ext_modules=[
        Extension("btrdelta.stream._speedups", ["src/btrdelta/stream/_speedups.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.receive._fastapply", ["src/btrdelta/receive/_fastapply.c"],
                  extra_compile_args=[*_FLAGS, "-D_GNU_SOURCE"],
                  **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.delta._unfold", ["src/btrdelta/delta/_unfold.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.delta._hpatch", ["src/btrdelta/delta/_hpatch.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.chunk._buzhash", ["src/btrdelta/chunk/_buzhash.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.tree._treewalk", ["src/btrdelta/tree/_treewalk.c"],
                  extra_compile_args=[*_FLAGS, "-D_GNU_SOURCE"],
                  **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.tree._columns", ["src/btrdelta/tree/_columns.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.fs._sweep", ["src/btrdelta/fs/_sweep.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta.send._cells", ["src/btrdelta/send/_cells.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        Extension("btrdelta._hugepages", ["src/btrdelta/_hugepages.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
        # xxHash from the system's header (libxxhash-dev), inlined: nothing linked
        Extension("btrdelta.send._blockhash", ["src/btrdelta/send/_blockhash.c"],
                  extra_compile_args=_FLAGS, **_SHARED),  # type: ignore[arg-type]
    ]
)
