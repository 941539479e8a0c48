"""Worker side of the multi-process test harness (see conftest.py, fixture ``procs``).

``node_host`` runs in a separate process (multiprocessing "spawn": this module must
stay importable without side effects). It starts one ``mesh.Node`` and then executes
commands from the control queue, one at a time, answering each on the result queue
with ``(cmd_id, ok, value)``. Messages received by subscriptions are recorded inside
the worker; the test fetches them with the ``collected`` command, which waits (with a
timeout) until enough have arrived, so no test ever sleeps to synchronise.

Everything that crosses the queues is plain data (dicts, lists, bytes, numpy arrays).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

import numpy as np

READY = "__ready__"


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (for states no wait_for_* covers)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def message_array(msg: Any) -> np.ndarray | None:
    import mesh

    try:
        return msg.array()
    except mesh.MeshError:
        return None


def record(msg: Any) -> dict:
    """A picklable summary of a mesh.Message.

    Arrays travel as (dtype.str, shape, bytes): pickling a numpy array does not keep
    a non-native byte order (numpy 2.4 unpickles '>i4' as '<i4'); see as_array().
    """
    arr = message_array(msg)
    return {
        "subject": msg.subject,
        "seq": msg.seq,
        "sender": msg.sender,
        "request_id": msg.request_id,
        "headers": dict(msg.headers),
        "data": None if arr is not None else bytes(msg.data),
        "array": None if arr is None else (arr.dtype.str, tuple(arr.shape), arr.tobytes()),
        "t": time.monotonic(),
    }


def as_array(rec: dict) -> np.ndarray:
    """The array a record describes, dtype and shape exactly as received."""
    assert rec["array"] is not None, f"message on {rec['subject']} carried bytes, not an array"
    dtype, shape, raw = rec["array"]
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


class _Collector:
    """Handler for one subscription: records every message, optionally answers."""

    def __init__(self, mode: str, delay: float = 0.0, burst: dict | None = None) -> None:
        self.mode = mode
        self.delay = delay  # seconds per message: a slow consumer
        self.burst = burst or {}  # mode "burst": {"subject": ..., "n": ...}
        self.records: list[dict] = []
        self.cond = threading.Condition()
        self.seen_ids: dict[int, int] = {}
        self.count = 0  # mode "count": messages seen, nothing kept

    def __call__(self, msg: Any) -> None:
        if self.mode == "count":  # large arrays: touch each, keep none (no copy)
            arr = message_array(msg)
            if arr is not None:
                float(arr.reshape(-1)[-1])
            with self.cond:
                self.count += 1
                self.cond.notify_all()
            return
        if self.mode == "gated":
            # Hold the dispatch thread until the test opens the gate (bounded).
            _STATE.setdefault("gate", threading.Event()).wait(60.0)
        if self.delay:
            time.sleep(self.delay)
        rec = record(msg)
        with self.cond:
            self.records.append(rec)
            n = self.seen_ids.get(msg.request_id, 0) + 1
            if msg.request_id is not None:
                self.seen_ids[msg.request_id] = n
            self.cond.notify_all()
        if self.mode == "echo":
            arr = message_array(msg)
            msg.respond(arr if arr is not None else rec["data"], headers={"echo": 1})
        elif self.mode == "respond_second":
            # Ignore the first attempt of each request, answer the retry.
            if n >= 2:
                msg.respond(b"second:" + (rec["data"] or b""))
        elif self.mode == "respond_name":
            msg.respond(_STATE["node"].name.encode())
        elif self.mode == "burst" and rec["data"] == b"kick":
            # From the handler (a thread of the node): n messages, no timeout, far
            # beyond the receiver's window.
            for i in range(1, self.burst["n"] + 1):
                _STATE["node"].publish(self.burst["subject"], str(i).encode())
        # "collect" and "never": record only

    def wait(self, n: int, timeout: float) -> list[dict]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.records) >= n, timeout)
            return list(self.records)


_STATE: dict[str, Any] = {}


def _summary(node: Any) -> dict:
    return {"id": node.id, "name": node.name, "endpoints": list(node.endpoints)}


def _run(node: Any, subs: dict, op: str, args: dict) -> Any:
    import mesh

    if op == "info":
        return _summary(node)
    if op == "status":
        return node.status()
    if op == "wait_for_peers":
        peers = node.wait_for_peers(args["n"], timeout=args.get("timeout", 10.0))
        return sorted(p.name for p in peers)
    if op == "peer_names":
        return sorted(p.name for p in node.peers())
    if op == "wait_for_subscribers":
        return node.wait_for_subscribers(
            args["subject"], args["count"], timeout=args.get("timeout", 10.0)
        )
    if op == "wait_peer_state":
        # Wait until peer `name` is in one of `states` (None: gone from peers()).
        name, states, timeout = args["name"], args["states"], args.get("timeout", 10.0)
        t0 = time.monotonic()

        def reached() -> bool:
            for p in node.status()["peers"]:
                if p["name"] == name:
                    return p["state"] in states
            return "absent" in states

        ok = wait_until(reached, timeout, interval=0.005)
        return {"ok": ok, "elapsed": time.monotonic() - t0,
                "alive": sorted(p.name for p in node.peers())}
    if op == "subscribe":
        collector = _Collector(args.get("mode", "collect"), args.get("delay", 0.0),
                               args.get("burst"))
        flow = {k: args[k] for k in ("credits", "credit_bytes", "overflow", "inline")
                if k in args}
        sub = node.subscribe(args["pattern"], collector, queue=args.get("queue"), **flow)
        sid = args.get("sid") or f"s{len(subs)}"
        subs[sid] = (sub, collector)
        return sid
    if op == "unsubscribe":
        sub, _ = subs[args["sid"]]
        node.unsubscribe(sub)
        return True
    if op == "collected":
        _, collector = subs[args["sid"]]
        return collector.wait(args.get("n", 0), args.get("timeout", 10.0))
    if op == "counted":  # mode "count": how many came, once n did (or the timeout)
        _, collector = subs[args["sid"]]
        with collector.cond:
            collector.cond.wait_for(lambda: collector.count >= args["n"], args.get("timeout", 10.0))
            return collector.count
    if op == "heap":  # mesh/engine/heap.py's state, and this process's page faults
        import resource

        from mesh.engine import heap

        return {**heap.stats, "ballast_bytes": node._ballast.held_bytes,
                "ballast_frames": len(node._ballast),
                "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}
    if op == "seen_ids":
        _, collector = subs[args["sid"]]
        with collector.cond:
            return dict(collector.seen_ids)
    if op == "publish":
        node.publish(args["subject"], args.get("data", b""), headers=args.get("headers"),
                     timeout=args.get("timeout"))
        return True
    if op == "publish_many":
        # data of message i (1-based) is str(i), so receivers can check order and content
        for i in range(1, args["n"] + 1):
            for subject in args["subjects"]:
                node.publish(subject, str(i).encode(), timeout=args.get("timeout", 5.0))
        return True
    if op == "publish_loop":
        # Publish str(i) for i in 1..n as fast as allowed; report how it went.
        t0 = time.monotonic()
        for i in range(1, args["n"] + 1):
            try:
                node.publish(args["subject"], str(i).encode() + b"." * args.get("pad", 0),
                             timeout=args.get("timeout"))
            except mesh.MeshError as exc:
                return {"error": type(exc).__name__, "text": str(exc), "sent": i - 1,
                        "elapsed": time.monotonic() - t0}
        return {"sent": args["n"], "elapsed": time.monotonic() - t0}
    if op == "publish_arrays":
        # n float32 arrays of `floats` elements, element 0 = the message number.
        arr = np.zeros(args["floats"], dtype=np.float32)
        t0 = time.monotonic()
        for i in range(1, args["n"] + 1):
            arr[0] = i
            node.publish(args["subject"], arr, timeout=args.get("timeout", 5.0))
        return {"sent": args["n"], "elapsed": time.monotonic() - t0}
    if op == "channel_send":
        # A collective's point-to-point send (Channel.send) of a float32 array.
        peer_id = next(p.id for p in node.peers() if p.name == args["peer"])
        channels = _STATE.setdefault("channels", {})
        if args["channel"] not in channels:
            channels[args["channel"]] = node._open_channel(args["channel"])
        try:
            channels[args["channel"]].send(peer_id, args.get("tag", 0),
                                           np.zeros(args["floats"], np.float32),
                                           timeout=args.get("timeout"))
        except mesh.MeshError as exc:
            return {"error": type(exc).__name__, "text": str(exc)}
        return {"sent": True}
    if op == "publish_loop_async":
        # The same in a background thread (so the test can act while it blocks).
        result: dict = {}
        def loop() -> None:
            result.update(_run(node, subs, "publish_loop", args))
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        _STATE.setdefault("loops", {})[args["key"]] = (thread, result)
        return True
    if op == "loop_result":
        thread, result = _STATE["loops"][args["key"]]
        thread.join(args.get("timeout", 10.0))
        return dict(result) if not thread.is_alive() else {"running": True}
    if op == "open_gate":
        _STATE.setdefault("gate", threading.Event()).set()
        return True
    if op == "rss":
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
    if op == "request":
        t0 = time.monotonic()
        try:
            reply = node.request(args["subject"], args.get("data", b""),
                                 timeout=args.get("timeout", 2.0),
                                 retries=args.get("retries", 0))
        except mesh.MeshError as exc:
            return {"error": type(exc).__name__, "text": str(exc),
                    "elapsed": time.monotonic() - t0}
        return {"reply": record(reply), "elapsed": time.monotonic() - t0}
    if op == "allreduce":
        # Form group `name` of `size`, wait `delay` s (the others wait for us), allreduce.
        with node.group(args["name"], args["size"], timeout=args.get("timeout", 20.0)) as g:
            time.sleep(args.get("delay", 0.0))
            return g.allreduce(np.asarray(args["array"]), args.get("reduce", "sum"))
    if op == "close":
        t0 = time.monotonic()
        node.close()
        return time.monotonic() - t0
    if op == "alive":
        return True
    raise ValueError(f"unknown op {op!r}")


def node_host(name: str, node_kwargs: dict, ctl: Any, out: Any) -> None:
    """Process entry point: run one node, obey commands until "exit" or end of queue."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    import mesh

    try:
        node = mesh.Node(name, **node_kwargs).start()
    except BaseException as exc:  # report, then die
        out.put((READY, False, f"{type(exc).__name__}: {exc}"))
        return
    _STATE["node"] = node
    out.put((READY, True, _summary(node)))
    subs: dict = {}
    try:
        while True:
            item = ctl.get()
            if item is None:
                break
            cmd_id, op, args = item
            if op == "exit":
                node.close()
                out.put((cmd_id, True, None))
                break
            try:
                value = _run(node, subs, op, args)
            except Exception as exc:
                out.put((cmd_id, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            else:
                out.put((cmd_id, True, value))
    finally:
        node.close()
