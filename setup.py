"""Build hook for the optional C accelerator; all metadata lives in pyproject.toml.

``btrdelta.stream._speedups`` is optional: without a C compiler or Python headers the build
skips it and btrdelta runs on its pure-Python code paths.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "btrdelta.stream._speedups",
            ["src/btrdelta/stream/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        )
    ]
)
