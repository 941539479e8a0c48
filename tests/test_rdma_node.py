"""Two nodes that pick RDMA for arrays, on real verbs devices (the RDMA VM).

Inside ``../shared/rdma-vm/run`` (``RDMA_VM=1``, soft-RoCE ``rxe0``/``rxe1``) two
processes (tests/rdma_node_peer.py) run a Node each, one per device, with control
on tcp and shared memory off: they bootstrap a queue pair over the control link,
status shows bulk "rdma", arrays up to 64 MiB and an allreduce go through it,
checked on the other side. Outside the VM it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IN_VM = os.environ.get("RDMA_VM") == "1"

if IN_VM:  # before anything imports pyverbs
    sys.path.insert(0, HERE)
    import rdma_peer

    rdma_peer.ensure_pyverbs_importable()
    rdma_peer.prepare_guest_network()

from transports.rdma import list_devices  # noqa: E402


def _vm_skip_reason() -> str | None:
    if not IN_VM:
        return ("not in the RDMA VM (RDMA_VM unset): run "
                "../shared/rdma-vm/run -- .venv/bin/python -m pytest tests/test_rdma_node.py")
    devices = list_devices()
    if not {"rxe0", "rxe1"} <= set(devices):
        return f"no verbs devices rxe0/rxe1 here (found {devices or 'none'})"
    return None


@pytest.mark.skipif(_vm_skip_reason() is not None, reason=_vm_skip_reason() or "")
def test_two_nodes_move_arrays_and_allreduce_over_rdma():
    py = sys.executable
    peer = os.path.join(HERE, "rdma_node_peer.py")
    a = subprocess.Popen([py, peer, "a", "--device", "rxe1"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = None
    try:
        line = a.stdout.readline()
        assert line.startswith("ENDPOINT "), f"node a did not start: {line!r}{a.stdout.read()}"
        b = subprocess.Popen([py, peer, "b", "--device", "rxe0", "--seed", line.split()[1]],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        results = {}
        for name, proc in (("b", b), ("a", a)):
            out, _ = proc.communicate(timeout=480)
            print(f"--- node {name} (exit {proc.returncode}):\n{out.strip()}")
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"node {name} printed no result:\n{out}"
            results[name] = json.loads(lines[-1][len("RESULT "):])
        for name, res in results.items():
            assert res["peer_before"]["bulk"] == "rdma", res
            assert res["ok"], f"node {name}: {res}"
        assert results["b"]["checks"]["f32_64mib"] and results["b"]["checks"]["64mib_over_rdma"]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
