"""mesh.torch: in-place allreduce on CPU tensors and the DDP communication hook.

Needs torch (``pip install 'zmesh[torch]'``): without it the module is skipped with
the reason printed (``pytest -ra``); tests/test_packaging.py checks the error that
``import mesh.torch`` raises then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


torch = pytest.importorskip(
    "torch", reason="torch is not installed: pip install 'zmesh[torch]' (torch==2.13.0)")
mt = pytest.importorskip("mesh.torch")


@pytest.fixture
def pair(make_node):
    """Two nodes of this process and, per test, a group on both (formed in threads)."""
    a = make_node("ta")
    b = make_node("tb", seeds=[a.endpoints[0]])
    a.wait_for_peers(1, timeout=10)
    b.wait_for_peers(1, timeout=10)
    pool = ThreadPoolExecutor(2)
    groups = list(pool.map(lambda n: n.group("torch", 2, timeout=20), (a, b)))
    yield groups, pool
    # Both at once: a member's close() waits (up to 5 s) for the others to close too.
    list(pool.map(lambda g: g.close(), groups))
    pool.shutdown()


def both(pool, fn, *per_rank):
    """fn(group, arg) on rank 0 and rank 1 at once; their results."""
    futures = [pool.submit(fn, *args) for args in per_rank]
    return [f.result(timeout=30) for f in futures]


class Recorder:
    """A group that records what reaches it (to show that no copy is made)."""

    def __init__(self, group):
        self.group, self.calls = group, []
        self.size, self.name = group.size, group.name

    def allreduce(self, arr, op="sum", out=None):
        self.calls.append((arr, out))
        return self.group.allreduce(arr, op=op, out=out)


def test_allreduce_in_place_without_copy(pair):
    groups, pool = pair
    recs = [Recorder(g) for g in groups]
    tensors = [torch.arange(1000, dtype=torch.float32) * (r + 1) for r in range(2)]
    ptrs = [t.data_ptr() for t in tensors]
    out = both(pool, mt.allreduce_, (recs[0], tensors[0]), (recs[1], tensors[1]))
    expected = torch.arange(1000, dtype=torch.float32) * 3
    for r in range(2):
        assert out[r] is tensors[r] and tensors[r].data_ptr() == ptrs[r]
        assert torch.equal(tensors[r], expected)
        ((arr, into),) = recs[r].calls
        assert into is arr and arr.ctypes.data == ptrs[r]  # the tensor's own memory, in and out


@pytest.mark.parametrize("dtype, op, values, expected", [
    (torch.float64, "max", ([1.0, 5.0], [3.0, 2.0]), [3.0, 5.0]),
    (torch.float16, "mean", ([1.0, 2.0], [3.0, 4.0]), [2.0, 3.0]),
    (torch.int64, "sum", ([1, 2], [3, 4]), [4, 6]),
    (torch.int32, "sum", ([2**31 - 1, 7], [1, 1]), [-(2**31), 8]),  # wraps, as torch does
    (torch.uint8, "prod", ([16, 3], [16, 2]), [0, 6]),
])
def test_allreduce_ops_and_dtypes(pair, dtype, op, values, expected):
    groups, pool = pair
    tensors = [torch.tensor(v, dtype=dtype) for v in values]
    both(pool, lambda g, t: mt.allreduce_(g, t, op=op), (groups[0], tensors[0]),
         (groups[1], tensors[1]))
    for t in tensors:
        assert t.dtype == dtype and t.tolist() == expected


def test_allreduce_on_a_parameter_that_requires_grad(pair):
    groups, pool = pair
    params = [torch.nn.Parameter(torch.full((4, 3), float(r + 1))) for r in range(2)]
    both(pool, mt.allreduce_, (groups[0], params[0]), (groups[1], params[1]))
    for p in params:
        assert p.requires_grad and torch.equal(p.detach(), torch.full((4, 3), 3.0))


@pytest.mark.parametrize("tensor, words", [
    (torch.arange(10.0)[::2], "not contiguous"),
    (torch.zeros(3, 4).t(), "not contiguous"),
    (torch.zeros(3, device="meta"), "is on meta"),
    (torch.zeros(3, dtype=torch.bfloat16), "no numpy view"),
    (torch.zeros(3, dtype=torch.int32), "cannot be written back"),  # op="mean" below
    (np.zeros(3), "must be a torch.Tensor"),
    (torch.zeros(3).to_sparse(), "only dense"),
])
def test_allreduce_refuses_what_it_cannot_do_in_place(tensor, words):
    op = "mean" if words == "cannot be written back" else "sum"
    with pytest.raises(mesh.ConfigError, match=words):
        mt.allreduce_(None, tensor, op=op)  # refused before any group is involved


class Bucket:
    """What DDP hands a comm hook: a flat gradient buffer."""

    def __init__(self, tensor):
        self._t = tensor

    def buffer(self):
        return self._t


@pytest.mark.parametrize("overlap", [True, False])
def test_comm_hook_averages_each_bucket_in_order(pair, overlap):
    groups, pool = pair
    hooks = [mt.comm_hook(g, overlap=overlap) for g in groups]
    rng = np.random.default_rng(0)
    grads = [[torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (7, 300, 1)]
             for _ in range(2)]
    expected = [(grads[0][i] + grads[1][i]) / 2 for i in range(3)]

    def backward(hook, buckets):
        futs = [hook(None, Bucket(t)) for t in buckets]  # as DDP calls it, bucket by bucket
        return [f.wait() for f in futs]

    results = both(pool, backward, (hooks[0], grads[0]), (hooks[1], grads[1]))
    for r in range(2):
        for i in range(3):
            assert results[r][i] is grads[r][i]  # the bucket itself, averaged in place
            assert torch.allclose(results[r][i], expected[i], rtol=1e-6, atol=1e-7)
        hooks[r].close()


def test_comm_hook_error_reaches_the_future(make_node):
    node = make_node("alone")
    group = node.group("solo", 1, timeout=5)
    hook = mt.comm_hook(group)
    group.close()
    fut = hook(None, Bucket(torch.ones(3)))
    with pytest.raises(mesh.MeshError):
        fut.wait()
    hook.close()
    with pytest.raises(mesh.MeshError, match="closed"):
        hook(None, Bucket(torch.ones(3)))


def test_comm_hook_refuses_what_is_not_a_group():
    with pytest.raises(mesh.ConfigError, match="mesh group"):
        mt.comm_hook(object())


def test_comm_hook_is_accepted_by_ddp_signature_checks():
    # DDP inspects the hook: a parameter named "bucket", no string annotations.
    import inspect

    hook = mt.comm_hook(type("G", (), {"allreduce": None, "size": 1, "name": "g"})())
    assert list(inspect.signature(hook).parameters) == ["state", "bucket"]
    assert inspect.signature(hook).return_annotation is inspect.Signature.empty


def test_torch_ddp_example_two_processes():
    """examples/torch_ddp.py: DDP + the mesh hook trains the same parameters as DDP + Gloo."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "torch_ddp.py"), "--workers", "2",
         "--steps", "20", "--timeout", "55"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the example and both ranks
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"torch_ddp.py did not finish within 60 s:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "OK: DDP with the mesh hook trained the same parameters" in out, out
    assert "max |gloo - mesh|" in out


def test_comm_hook_starts_no_thread_before_the_first_bucket():
    # Its thread (a daemon) starts with the first bucket DDP hands it, not before.
    before = {t.name for t in threading.enumerate()}
    mt.comm_hook(type("G", (), {"allreduce": None, "size": 1, "name": "g"})())
    assert {t.name for t in threading.enumerate()} == before
