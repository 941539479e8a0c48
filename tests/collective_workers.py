"""Worker side of the collective tests (see test_collectives.py).

``group_host`` runs in a separate process (multiprocessing "spawn": importable
without side effects). It starts one ``mesh.Node``, then obeys commands from its
control queue one at a time, answering each with ``(cmd_id, ok, value)``.

Inputs are never shipped between processes: a case names a seed, and every
worker generates *all* ranks' inputs from it (``make_input``), so each can check
its own result against plain numpy (``np.sum(np.stack(inputs), axis=0)`` and
friends: not the code under test) and return only a verdict and a digest. The
test then checks that the digests agree (results identical on every rank).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from typing import Any

import numpy as np

READY = "__ready__"

NUMPY_OPS = {"sum": np.sum, "mean": np.mean, "min": np.min, "max": np.max, "prod": np.prod}


# ---------------------------------------------------------------------- inputs


def make_input(seed: int, rank: int, dtype: str, shape: tuple, op: str = "sum",
               layout: str = "c") -> np.ndarray:
    """Rank ``rank``'s input of a case: deterministic, small values (no overflow
    surprises for prod), optionally non-contiguous (``layout="transposed"``) or
    mostly signed zeros (``layout="zeros"``)."""
    rng = np.random.default_rng([seed, rank])
    dt = np.dtype(dtype)
    shape = tuple(shape)
    if layout == "transposed":
        shape = shape[::-1]
    if layout == "zeros":  # signed zeros and a few ordinary values (floats only)
        return rng.choice(np.array([0.0, -0.0, 1.5, -1.5], dtype=dt), size=shape)
    if dt.kind == "b":
        arr = rng.integers(0, 2, size=shape).astype(bool)
    elif dt.kind in "iu":
        lo, hi = (1, 3) if op == "prod" else ((0, 100) if dt.kind == "u" else (-100, 100))
        hi = min(hi, int(np.iinfo(dt).max))
        arr = rng.integers(lo, hi + 1, size=shape).astype(dt)
    elif dt.kind == "f":
        arr = (rng.uniform(0.5, 1.5, size=shape) if op == "prod"
               else rng.uniform(-10, 10, size=shape)).astype(dt)
    elif dt.kind == "c":
        arr = (rng.uniform(0.5, 1.5, size=shape) + 1j * rng.uniform(-0.5, 0.5, size=shape)).astype(dt)
    else:
        raise ValueError(dtype)
    if layout == "transposed":
        arr = arr.T
        assert arr.ndim < 2 or not arr.flags.c_contiguous or arr.size <= 1
    return arr


def digest(arr: np.ndarray) -> str:
    h = hashlib.sha1(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _tolerance(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind not in "fc":
        return 0.0, 0.0
    if dtype.itemsize <= 2:  # float16: a few ulps of sums up to ~50
        return 1e-2, 1e-1
    if dtype in (np.float32, np.complex64):
        return 1e-5, 1e-4
    return 1e-12, 1e-10


def compare(result: np.ndarray, expected: np.ndarray) -> tuple[bool, str]:
    expected = np.asarray(expected)
    if result.dtype != expected.dtype:
        return False, f"dtype {result.dtype} != numpy's {expected.dtype}"
    if result.shape != expected.shape:
        return False, f"shape {result.shape} != {expected.shape}"
    rtol, atol = _tolerance(expected.dtype)
    if rtol == 0.0:
        ok = np.array_equal(result, expected)
        return ok, "" if ok else f"values differ at {np.flatnonzero(result != expected)[:5]}"
    ok = np.allclose(result, expected, rtol=rtol, atol=atol)
    if ok:
        return True, ""
    err = np.max(np.abs(result.astype(np.complex128) - expected.astype(np.complex128)))
    return False, f"max abs error {err}"


# ---------------------------------------------------------------------- cases


def run_case(group: Any, case: dict) -> dict:
    """Run one collective case; return {"ok", "why", "digest", ...} or {"error": ...}."""
    import mesh

    kind = case["kind"]
    size, rank = group.size, group.rank
    t0 = time.perf_counter()
    try:
        if kind == "allreduce":
            op, dtype, shape = case["op"], case["dtype"], tuple(case["shape"])
            layout = case.get("layout", "c")
            inputs = [make_input(case["seed"], r, dtype, shape, op, layout) for r in range(size)]
            mine = inputs[rank]
            before = mine.copy()
            expected = NUMPY_OPS[op](np.stack(inputs), axis=0)
            kwargs: dict = {}
            if case.get("out") == "inplace":
                mine = mine.copy()
                kwargs["out"] = mine
            elif case.get("out") == "separate":
                kwargs["out"] = np.full(expected.shape, 7, dtype=expected.dtype)
            out = group.allreduce(mine, op=op, algorithm=case.get("algorithm", "auto"), **kwargs)
            ok, why = compare(out, expected)
            if ok and kwargs and out is not kwargs["out"]:
                ok, why = False, "allreduce(out=) did not return out"
            if ok and "out" not in case and not np.array_equal(mine, before):
                ok, why = False, "allreduce modified its input"
            return {"ok": ok, "why": why, "digest": digest(out), "s": time.perf_counter() - t0}
        if kind == "reduce_scatter":
            op, dtype, n = case["op"], case["dtype"], case["n"]
            inputs = [make_input(case["seed"], r, dtype, (n,), op) for r in range(size)]
            out = group.reduce_scatter(inputs[rank], op=op)
            full = NUMPY_OPS[op](np.stack(inputs), axis=0)
            q, extra = divmod(n, size)
            start = rank * q + min(rank, extra)
            stop = start + q + (1 if rank < extra else 0)
            ok, why = compare(out, full[start:stop])
            return {"ok": ok, "why": why, "digest": digest(full), "s": time.perf_counter() - t0}
        if kind == "broadcast":
            root, dtype, shape = case["root"], case["dtype"], tuple(case["shape"])
            data = make_input(case["seed"], root, dtype, shape)
            arr = data.copy() if rank == root else np.zeros(shape, dtype=dtype)
            # "across_hosts": plan as if the members were on different hosts (tree or
            # chain, relayed cut-through), which one machine's processes are not
            was = group._across_hosts
            group._across_hosts = case.get("across_hosts", was)
            try:
                out = group.broadcast(arr, root=root)
            finally:
                group._across_hosts = was
            ok, why = compare(out, data)
            if ok and not np.array_equal(arr, data):
                ok, why = False, "the array passed was not updated in place"
            return {"ok": ok, "why": why, "digest": digest(out), "s": time.perf_counter() - t0}
        if kind == "allgather":
            dtype, shapes = case["dtype"], [tuple(s) for s in case["shapes"]]
            inputs = [make_input(case["seed"], r, dtype, shapes[r]) for r in range(size)]
            out_arg = None
            if case.get("out"):  # every part the same shape: one preallocated (size, *shape)
                out_arg = np.full((size, *shapes[rank]), 7, dtype=dtype)
                if case["out"] == "own":  # the input is out[rank] itself
                    out_arg[rank] = inputs[rank]
                    inputs[rank] = out_arg[rank]
            parts = (group.allgather(inputs[rank]) if out_arg is None
                     else group.allgather(inputs[rank], out=out_arg))
            if out_arg is not None and not all(
                    (p.size == 0 or np.shares_memory(p, out_arg[r])) and p.shape == out_arg[r].shape
                    for r, p in enumerate(parts)):
                return {"ok": False, "why": "allgather(out=) parts are not views of out"}
            if len(parts) != size:
                return {"ok": False, "why": f"{len(parts)} parts for {size} ranks"}
            for r in range(size):
                ok, why = compare(parts[r], inputs[r])
                if not ok:
                    return {"ok": False, "why": f"part {r}: {why}"}
            return {"ok": True, "why": "", "digest": digest(np.concatenate([p.ravel() for p in parts])),
                    "s": time.perf_counter() - t0}
        if kind == "barrier":
            if rank == case.get("late_rank", -1):
                time.sleep(case.get("delay", 0.2))
            entered = time.time()
            group.barrier()
            return {"ok": True, "why": "", "entered": entered, "left": time.time()}
        if kind == "gossip":
            n, eps = case["n"], case.get("eps", 1e-6)
            inputs = [make_input(case["seed"], r, "float64", (n,)) for r in range(size)]
            out = group.gossip_average(inputs[rank], eps=eps)
            mean = np.mean(np.stack(inputs), axis=0)
            bound = eps * max(float(np.max(np.abs(x))) for x in inputs) if n else 0.0
            err = float(np.max(np.abs(out - mean))) if n else 0.0
            ok = out.shape == (n,) and out.dtype == np.float64 and err <= bound
            return {"ok": ok, "why": f"error {err} vs bound {bound}", "err": err, "bound": bound}
        if kind == "mismatch":
            # Rank 0 passes one more element than the others: every rank must fail fast.
            n = 1000 + (1 if rank == 0 else 0)
            group.allreduce(np.ones(n, np.float32), algorithm=case.get("algorithm", "ring"))
            return {"ok": False, "why": "a shape mismatch went unnoticed"}
        if kind == "bad_op":
            group.allreduce(np.ones(4), op="median")
            return {"ok": False, "why": "op='median' was accepted"}
        raise ValueError(f"unknown case kind {kind!r}")
    except mesh.MeshError as exc:
        return {"error": type(exc).__name__, "text": str(exc),
                "peer": getattr(exc, "peer", None), "s": time.perf_counter() - t0}


# ---------------------------------------------------------------------- commands


def _group_info(g: Any) -> dict:
    return {"rank": g.rank, "size": g.size, "incarnation": g.incarnation,
            "members": [tuple(m) for m in g.members]}


def _error(exc: BaseException) -> dict:
    return {"error": type(exc).__name__, "text": str(exc), "peer": getattr(exc, "peer", None),
            "t": time.time()}


def _run(node: Any, groups: dict, op: str, args: dict) -> Any:
    import mesh

    if op == "info":
        return {"id": node.id, "name": node.name, "endpoints": list(node.endpoints)}
    if op == "wait_for_peers":
        return len(node.wait_for_peers(args["n"], timeout=args.get("timeout", 20.0)))
    if op == "peer_states":
        return {p["name"]: p["state"] for p in node.status()["peers"]}
    if op == "bulk_stats":  # the bulk tcp channel's state per peer (status())
        return {p["name"]: p.get("tcpbulk") for p in node.status()["peers"]}
    if op == "group":
        g = node.group(args["name"], args["size"], timeout=args.get("group_timeout", 20.0),
                       **args.get("options", {}))
        groups[args["name"]] = g
        return _group_info(g)
    if op == "close_group":
        groups.pop(args["name"]).close()
        return True
    if op == "cases":
        g = groups[args["group"]]
        return [run_case(g, case) for case in args["cases"]]
    if op == "concurrent":
        # One thread per group, each running its own cases at the same time.
        results: dict[str, Any] = {}

        def work(name: str, cases: list) -> None:
            results[name] = [run_case(groups[name], c) for c in cases]

        threads = [threading.Thread(target=work, args=(n, c)) for n, c in args["work"].items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.get("timeout", 60.0))
        return results
    if op == "allreduce_loop":
        # Big allreduces until one fails (a member gets killed meanwhile).
        g = groups[args["group"]]
        x = np.full(args["elems"], float(g.rank + 1), dtype=np.float32)
        done = 0
        t_start = time.time()
        try:
            for _ in range(args["iterations"]):
                g.allreduce(x)
                done += 1
        except mesh.MeshError as exc:
            return {**_error(exc), "iterations": done, "started": t_start}
        return {"iterations": done, "started": t_start, "error": None}
    if op == "broadcast_loop":
        # Big broadcasts from rank 0 until one fails (the root gets killed meanwhile).
        g = groups[args["group"]]
        g._across_hosts = args.get("across_hosts", g._across_hosts)  # (see run_case)
        x = np.full(args["elems"], 1.0, dtype=np.float32)
        done = 0
        t_start = time.time()
        try:
            for _ in range(args["iterations"]):
                g.broadcast(x, root=0)
                done += 1
        except mesh.MeshError as exc:
            return {**_error(exc), "iterations": done, "started": t_start}
        finally:
            g._across_hosts = False
        return {"iterations": done, "started": t_start, "error": None}
    if op == "late_allreduce":
        # Ranks in `late` sleep first: a straggler that is alive but not participating.
        g = groups[args["group"]]
        if g.rank in args["late"]:
            time.sleep(args["delay"])
        t0 = time.time()
        try:
            g.allreduce(np.ones(1000, np.float32))
        except mesh.MeshError as exc:
            return {**_error(exc), "entered": t0}
        return {"error": None, "entered": t0}
    if op == "reform":
        g = groups[args["group"]]
        try:
            g.reform(timeout=args.get("timeout"))
        except mesh.MeshError as exc:
            return _error(exc)
        return _group_info(g)
    if op == "stats":
        return groups[args["group"]].stats()
    raise ValueError(f"unknown op {op!r}")


def group_host(name: str, node_kwargs: dict, ctl: Any, out: Any) -> None:
    """Process entry point: one node; commands until "exit" or the queue ends."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    import mesh

    try:
        node = mesh.Node(name, **node_kwargs).start()
    except BaseException as exc:
        out.put((READY, False, f"{type(exc).__name__}: {exc}"))
        return
    out.put((READY, True, {"id": node.id, "name": node.name, "endpoints": list(node.endpoints)}))
    groups: dict = {}
    try:
        while True:
            item = ctl.get()
            if item is None:
                break
            cmd_id, op, args = item
            if op == "exit":
                break
            try:
                value = _run(node, groups, op, args)
            except Exception as exc:
                out.put((cmd_id, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            else:
                out.put((cmd_id, True, value))
    finally:
        for g in groups.values():
            g.close()
        node.close()
        out.put((0, True, "bye"))
