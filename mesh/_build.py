"""Which build of the hot path runs: compiled (Cython, pure-Python mode) or pure.

The modules in ``COMPILED`` are plain Python, each with a ``.pxd`` beside it
where types help; ``setup.py`` compiles them with Cython when the package is
installed (``pip install`` / ``make venv``) unless ``MESH_PURE_PYTHON=1``. One
source, two builds: the ``.py`` is what both run.

At run time (``mesh/__init__.py`` calls :func:`install` before importing any
of them) a finder on ``sys.meta_path`` decides per module:

- ``MESH_PURE_PYTHON=1`` in the environment: the ``.py`` is imported even
  when a compiled module sits beside it (``make test-pure`` runs this way in the
  same virtualenv);
- a compiled module older than its ``.py`` (an editable install whose source
  was edited after the build): the ``.py`` is imported, with one warning saying
  how to rebuild. An edit is never silently ignored.

``mesh.compiled`` (and ``mesh bench`` / status) says which build runs: True only
when every module in ``COMPILED`` came from its compiled extension.

Who owns what: nothing here runs after import; the finder only answers
``find_spec`` for the names in ``COMPILED``. Stdlib only: ``setup.py`` reads
``COMPILED`` from this file before the package's dependencies are installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from typing import Any

# The hot path: what the profile named (bench/hotpath.py) and compiling measurably
# speeds up. Only typed code pays: the publish fast path, the receive path of batches
# (engine/receive.py: runs to handlers, credit back) and the C types they use (Link,
# CreditWindow, Counters, Message, Run). The engine's mixins (node,
# loop, dispatch) and wire/routing/subjects, compiled without types, ran no faster
# than CPython 3.11's specialising interpreter (bench/README.md, 2026-12-06): they
# stay Python. engine.zcore is C the I/O thread calls libzmq through (no pyzmq layers,
# one GIL hand-over per wake-up): its pure build only says it is not available.
COMPILED = (
    "mesh.engine.fastpath",
    "mesh.engine.link",
    "mesh.engine.receive",
    "mesh.engine.zcore",
    "mesh.flow",
    "mesh.message",
    "mesh.stats",
)

PURE_ENV = "MESH_PURE_PYTHON"
_SLACK = 2.0  # seconds a source may be newer than its compiled module and still match

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def source_path(name: str) -> str:
    return os.path.join(_ROOT, *name.split(".")) + ".py"


def compiled_path(name: str) -> str | None:
    """The compiled extension of ``name`` beside its source, if one was built."""
    base = os.path.join(_ROOT, *name.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(base + suffix):
            return base + suffix
    return None


class _Finder:
    """Imports the ``.py`` of a compiled module when asked to or when it is newer."""

    def __init__(self, pure: bool) -> None:
        self.pure = pure
        self.stale: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in COMPILED:
            return None
        source = source_path(name)
        ext = compiled_path(name)
        if ext is None or not os.path.exists(source):
            return None  # the usual import: the only thing there is
        if not self.pure:
            # (A wheel installs both within a moment, in any order: hence the slack.)
            if os.path.getmtime(source) <= os.path.getmtime(ext) + _SLACK:
                return None  # the usual import finds the extension first
            self.stale.append(name)
            warnings.warn(
                f"{source} changed after it was compiled: running the .py (slower); "
                "rebuild with `make build` (or `pip install -e .`)",
                RuntimeWarning, stacklevel=2,
            )
        return importlib.util.spec_from_file_location(name, source)


_finder: _Finder | None = None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    global _finder
    if _finder is None:
        _finder = _Finder(pure_requested())
        sys.meta_path.insert(0, _finder)


def is_compiled(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and isinstance(
        getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def compiled() -> bool:
    """True when every hot-path module runs compiled."""
    return all(is_compiled(name) for name in COMPILED if name in sys.modules) and all(
        name in sys.modules for name in COMPILED)


def describe() -> str:
    """One line for status and ``mesh bench``: which build runs, and why."""
    if compiled():
        return "compiled (Cython)"
    if _finder is not None and _finder.pure:
        return f"pure Python ({PURE_ENV}=1)"
    missing = [n for n in COMPILED if n in sys.modules and not is_compiled(n)]
    if _finder is not None and _finder.stale:
        return f"pure Python for {', '.join(_finder.stale)} (edited after the build: make build)"
    if missing and all(compiled_path(n) is None for n in COMPILED):
        return "pure Python (not compiled: installed with MESH_PURE_PYTHON=1 or without a C compiler)"
    return "partly compiled: pure " + ", ".join(missing)
