"""torch tensors over mesh groups: in-place allreduce and a DDP communication hook.

    import mesh.torch as mt
    mt.allreduce_(group, tensor, op="sum")          # in place on a CPU tensor, no copy
    model = torch.nn.parallel.DistributedDataParallel(model)   # any process group for setup
    model.register_comm_hook(None, mt.comm_hook(group))         # gradient buckets over the mesh

Optional: importing this module without torch raises
:class:`mesh.errors.MissingDependency` (a :class:`mesh.MeshError` and an
``ImportError``) naming the install command, ``pip install 'zmesh[torch]'``
(``torch==2.13.0``, the CPU wheel).

Tensors reach the group as numpy views of their own memory (``tensor.numpy()``
shares it), and the group reduces in place into that memory (``out=`` the
input): a contiguous float tensor is never copied. Integer tensors narrower
than 64 bits are the exception: numpy's sums widen, so their result is
computed apart and cast back into the tensor (wrapping as torch's own
``all_reduce`` does).

Threads. ``allreduce_`` runs on the caller's thread. ``comm_hook`` owns one
thread per hook (``mesh-torch-hook-<group>``, started at the first bucket):
DDP calls the hook on its autograd thread, the hook queues the bucket and
returns a future at once, and that thread runs the bucket allreduces one at a
time in the order DDP produced them (the same order on every rank, as DDP
guarantees), so the backward pass goes on computing while a bucket is on the
wire. While a backward pass is running that thread is the only user of the
group; ``loss.backward()`` returns only after every bucket's future resolved,
so the caller may use the group again from then on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from mesh.collectives import reduce as red
from mesh.errors import ConfigError, MeshError, MissingDependency

try:
    import torch
except ImportError as exc:  # torch is an optional extra
    raise MissingDependency(
        f"mesh.torch needs torch, which is not importable here ({exc}); install it with "
        "`pip install 'zmesh[torch]'` (the `torch` extra: torch==2.13.0, CPU)"
    ) from exc

__all__ = ["allreduce_", "comm_hook", "numpy_view"]


def numpy_view(tensor: torch.Tensor, what: str = "tensor") -> np.ndarray:
    """The numpy view of ``tensor``'s memory (no copy); a clear error when there is none."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ConfigError(
            f"{what} is on {tensor.device}: mesh.torch reduces CPU tensors in place; move it "
            "with tensor.cpu() (and copy the result back), or use NCCL for GPU tensors"
        )
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise ConfigError(f"{what} has layout {tensor.layout}: only dense tensors; "
                          "call tensor.to_dense()")
    if not tensor.is_contiguous():
        # As torch.distributed refuses them: the reduction writes into the tensor's own
        # memory, and a strided tensor's elements are not one block of it.
        raise ConfigError(
            f"{what} is not contiguous (shape {tuple(tensor.shape)}, stride "
            f"{tuple(tensor.stride())}); pass t = tensor.contiguous() and copy the result "
            "back with tensor.copy_(t)"
        )
    try:
        # detach(): a view of the same memory without autograd (numpy() refuses
        # tensors that require grad); resolve_conj/neg would copy, so refuse those.
        return tensor.detach().numpy()
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"{what} of dtype {tensor.dtype} has no numpy view ({exc}); cast it, e.g. "
            "tensor.float(), and copy the result back"
        ) from None


def allreduce_(group: Any, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` with ``op``, in place; returns ``tensor``.

    Same ops as ``group.allreduce`` (sum, mean, min, max, prod). The tensor's
    memory is handed to the group as a numpy view and the result written into
    it: no copy for float tensors (and 64-bit integers). CPU, contiguous,
    numpy-representable dtypes only (bfloat16 is not: cast it first).
    """
    arr = numpy_view(tensor)
    want = red.result_dtype(op, arr.dtype)
    if want == arr.dtype:
        group.allreduce(arr, op=op, out=arr)
    elif arr.dtype.kind in "iu" and op != "mean":
        # numpy widens integer sums/products; torch keeps the tensor's dtype and wraps.
        np.copyto(arr, group.allreduce(arr, op=op), casting="unsafe")
    else:
        raise ConfigError(
            f"op={op!r} on a {tensor.dtype} tensor has a {want} result, which cannot be "
            "written back in place; use op='sum' and divide, or cast the tensor to float"
        )
    return tensor


class _HookWorker:
    """The hook's thread: runs bucket allreduces in arrival order, resolves futures."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, tensor: torch.Tensor, fut: torch.futures.Future) -> None:
        with self._lock:
            if self._closed:
                raise MeshError("this comm_hook was closed; register a new mt.comm_hook(group)")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mesh-torch-hook-{self.group.name}", daemon=True
                )
                self._thread.start()
        self._jobs.put((tensor, fut))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            tensor, fut = job
            try:
                _average(self.group, tensor)
            except Exception as exc:  # handed to the thread that waits on the future
                fut.set_exception(exc)
            else:
                fut.set_result(tensor)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout=5.0)


def _average(group: Any, tensor: torch.Tensor) -> None:
    # Divide first, then sum: what torch's own allreduce_hook does (and a float16
    # bucket cannot overflow in the sum).
    tensor.div_(group.size)
    allreduce_(group, tensor, op="sum")


def comm_hook(group: Any, *, overlap: bool = True) -> Callable[..., Any]:
    """A DDP communication hook that averages each gradient bucket over ``group``.

    ``model.register_comm_hook(None, mt.comm_hook(group))``: every rank of
    the DDP model must be a member of ``group`` (e.g. ``node.group_from_env()``).
    The result equals DDP's default allreduce-mean to float tolerance.
    ``overlap=True`` (default) runs the allreduces on the hook's own thread
    while backward continues (see the module docstring); ``overlap=False``
    runs each one inside the hook, on DDP's autograd thread. The returned
    hook has ``close()``, which stops its thread (optional: it is a daemon).
    """
    if not hasattr(group, "allreduce") or not hasattr(group, "size"):
        raise ConfigError(f"comm_hook needs a mesh group (node.group(...)), got {group!r}")
    worker = _HookWorker(group)

    # DDP inspects the signature: the parameter must be named ``bucket`` and any
    # annotation must be the real classes, not strings, so none are given here.
    def mesh_allreduce_hook(state, bucket):  # noqa: ANN001, ANN202
        tensor = bucket.buffer()
        fut: torch.futures.Future = torch.futures.Future()
        if overlap:
            worker.submit(tensor, fut)
        else:
            _average(group, tensor)
            fut.set_result(tensor)
        return fut

    mesh_allreduce_hook.close = worker.close  # type: ignore[attr-defined]
    return mesh_allreduce_hook
