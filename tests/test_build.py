"""The two builds of the hot path (mesh/_build.py): compiled and pure Python.

Which one runs is decided per module at import; these tests check that the
choice is the one asked for, in a fresh interpreter each (a module imported once
stays imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from mesh import _build

_PROBE = """
import importlib, json, sys
import mesh
from mesh import _build
files = {name: sys.modules[name].__file__ for name in _build.COMPILED}
print(json.dumps({"compiled": mesh.compiled, "describe": _build.describe(), "files": files}))
"""


def _probe(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    if pure:
        env[_build.PURE_ENV] = "1"
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", _PROBE], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_hot_module_is_imported_by_import_mesh() -> None:
    # mesh.compiled speaks for all of them only if `import mesh` imports them all.
    got = _probe(pure=True)
    assert set(got["files"]) == set(_build.COMPILED)


def test_pure_env_runs_the_py_of_every_hot_module() -> None:
    got = _probe(pure=True)
    assert got["compiled"] is False
    assert "MESH_PURE_PYTHON" in got["describe"]
    for name, path in got["files"].items():
        assert path == _build.source_path(name), name


def test_the_compiled_build_is_what_gets_imported() -> None:
    built = [name for name in _build.COMPILED if _build.compiled_path(name)]
    if not built:
        # CI (MESH_REQUIRE_COMPILED=1) must have built it: never skip there.
        assert not os.environ.get("MESH_REQUIRE_COMPILED"), "the hot path was not compiled"
        pytest.skip("installed without the compiled hot path (MESH_PURE_PYTHON=1 or no gcc)")
    got = _probe(pure=False)
    assert sorted(built) == sorted(_build.COMPILED), "some hot modules were not compiled"
    for name, path in got["files"].items():
        assert path == _build.compiled_path(name), f"{name} ran from {path}"
    assert got["compiled"] is True
    assert got["describe"] == "compiled (Cython)"


def test_a_source_edited_after_the_build_runs_instead_with_a_warning(tmp_path, monkeypatch) -> None:
    # An editable install whose .py changed after the compile: the .py runs, loudly.
    name = "mesh.stats"
    assert name in _build.COMPILED
    pkg = tmp_path / "mesh"
    pkg.mkdir()
    source = pkg / "stats.py"
    source.write_text("X = 1\n")
    ext = pkg / ("stats" + _build.importlib.machinery.EXTENSION_SUFFIXES[0])
    ext.write_bytes(b"")
    monkeypatch.setattr(_build, "_ROOT", str(tmp_path))
    finder = _build._Finder(pure=False)

    os.utime(ext, (1000.0, 1000.0))
    os.utime(source, (1000.0 + _build._SLACK / 2, 1000.0 + _build._SLACK / 2))
    assert finder.find_spec(name) is None  # built after (or with) it: the usual import

    os.utime(source, (2000.0, 2000.0))  # edited later
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = finder.find_spec(name)
    assert spec is not None and spec.origin == str(source)
    assert any("make build" in str(w.message) for w in caught)
    assert finder.stale == [name]
    assert finder.find_spec("mesh.status") is None  # not a compiled module: not ours


def test_status_and_bench_say_which_build_runs() -> None:
    import mesh

    with mesh.Node("build-probe", cluster="build-test", discovery="none",
                   listen=("tcp://127.0.0.1:0",)) as node:
        assert node.status()["build"] == _build.describe()
    assert mesh.compiled == _build.compiled()
    if os.environ.get(_build.PURE_ENV):
        assert mesh.compiled is False
