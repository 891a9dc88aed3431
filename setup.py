"""Build hook for the optional C accelerator; all metadata lives in pyproject.toml.

``btrdelta.stream._speedups``, ``btrdelta.receive._fastapply`` and ``btrdelta.delta._unfold``
are optional: without a C
compiler or Python headers the build skips them and btrdelta runs on its pure-Python code
paths.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension("btrdelta.stream._speedups", ["src/btrdelta/stream/_speedups.c"],
                  optional=True, extra_compile_args=_FLAGS),
        Extension("btrdelta.receive._fastapply", ["src/btrdelta/receive/_fastapply.c"],
                  optional=True, extra_compile_args=[*_FLAGS, "-D_GNU_SOURCE"]),
        Extension("btrdelta.delta._unfold", ["src/btrdelta/delta/_unfold.c"],
                  optional=True, extra_compile_args=_FLAGS),
    ]
)
