"""The distribution ships every package and declares its plugins and scripts."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top in ("mesh", "discovery", "transports"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    for package, directory in config.get("package-dir", {}).items():
        assert (ROOT / directory / "__init__.py").exists(), package
        found.add(package)
    assert found == listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_transport_plugins_are_entry_points() -> None:
    names = {ep.name for ep in entry_points(group="mesh.transports")}
    assert {"inproc", "ipc", "tcp", "rdma"} <= names


def test_mesh_transports_available_lists_usable_transports_best_first() -> None:
    import mesh

    usable = mesh.transports.available()
    assert {"inproc", "ipc", "tcp"} <= set(usable)
    ranks = [mesh.transports.plugins()[name].rank for name in usable]
    assert ranks == sorted(ranks)  # best first: inproc, (shm, rdma,) ipc, tcp


def test_stale_ipc_socket_files_are_removed_and_live_ones_kept(tmp_path) -> None:
    import os
    import socket
    import time

    from transports.zmq_transports import STALE_AFTER, remove_stale_sockets

    def unix_socket(name: str, listen: bool) -> tuple[str, socket.socket]:
        path = str(tmp_path / name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        if listen:
            sock.listen()
        return path, sock

    dead, dead_sock = unix_socket("zmesh-dead.sock", listen=False)
    dead_sock.close()  # a killed node: the file stays, nobody listens
    young, young_sock = unix_socket("zmesh-young.sock", listen=False)
    young_sock.close()
    live, live_sock = unix_socket("zmesh-live.sock", listen=True)
    other, other_sock = unix_socket("not-ours.sock", listen=False)
    other_sock.close()
    old = time.time() - STALE_AFTER - 10
    for path in (dead, live, other):
        os.utime(path, (old, old))
    try:
        assert remove_stale_sockets(str(tmp_path)) == [dead]
        assert not os.path.exists(dead)
        assert all(os.path.exists(p) for p in (young, live, other))
    finally:
        live_sock.close()


def test_import_without_torch_names_the_install_command() -> None:
    # The `torch` extra is optional: without it, a MeshError that is also an ImportError.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mesh\n"
            "try:\n"
            "    import mesh.torch\n"
            "except mesh.MeshError as exc:\n"
            "    assert isinstance(exc, ImportError), type(exc)\n"
            "    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingDependency"), out.stdout
    assert "pip install 'zmesh[torch]'" in out.stdout and "torch==2.13.0" in out.stdout
