"""Builds the compiled hot path (Cython, pure-Python mode): the modules listed in
mesh/_build.py, each from its own ``.py`` (with the ``.pxd`` beside it).

    pip install -e .                       # compiled (gcc), the default
    MESH_PURE_PYTHON=1 pip install -e .    # pure Python: nothing compiled
    MESH_REQUIRE_COMPILED=1 pip install .  # a failed compile fails the install (CI)

Without a C compiler the install falls back to pure Python with a warning
(``mesh.compiled`` is then False). Everything else is in pyproject.toml.
"""

from __future__ import annotations

import glob
import os
import runpy
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = runpy.run_path(os.path.join(HERE, "mesh", "_build.py"))
MODULES = BUILD["COMPILED"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _remove_stale_extensions() -> None:
    """A pure build must not leave an earlier build's modules beside the sources:
    Python would import those instead of the .py."""
    for name in MODULES:
        base = os.path.join(HERE, *name.split("."))
        for path in glob.glob(base + ".*.so") + glob.glob(base + ".*.pyd"):
            os.unlink(path)
            print(f"MESH_PURE_PYTHON: removed {os.path.relpath(path, HERE)}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compiles in parallel; a failure falls back to pure Python unless required."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if _flag("MESH_REQUIRE_COMPILED"):
                raise
            print(f"WARNING: the compiled hot path did not build ({exc}); zmesh runs as "
                  "pure Python (slower). Install gcc and reinstall.", file=sys.stderr)


def _extensions() -> list:
    if _flag("MESH_PURE_PYTHON"):
        _remove_stale_extensions()
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        if _flag("MESH_REQUIRE_COMPILED"):
            raise
        print("WARNING: Cython is missing; zmesh runs as pure Python", file=sys.stderr)
        return []
    exts = [Extension(name, [os.path.join(*name.split(".")) + ".py"],
                      extra_compile_args=["-O2", "-g0"]) for name in MODULES]
    return cythonize(
        exts,
        build_dir="build/cython",  # the generated C stays out of the source tree
        nthreads=os.cpu_count() or 1,
        compiler_directives={
            "language_level": "3",
            # Annotations stay hints, as in the .py (a float annotation would make
            # Cython refuse ints and None); the .pxd files carry the C types.
            "annotation_typing": False,
            "binding": True,  # inspect.signature and monkeypatching work as on the .py
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
