"""One mesh node on one lab host, driven over JSON lines (tests/test_lan.py).

Host side, run inside a host of the namespace lab tests/harness/netns_lab.sh::

    tests/harness/netns_lab.sh exec I .venv/bin/python -m tests.lanhost --name h1 --cluster C

starts ``mesh.Node(discovery="zeroconf", interfaces=["eth0"])`` (no seeds, no
address; ``--secret-file``, ``--policy`` and ``--seeds`` add a cluster secret, a
permission policy and seed endpoints, for tests/test_lan_security.py;
``--discovery static --seeds ...`` joins through seeds only, for
tests/test_quiet_logs.py), prints
``{"ev": "ready", ...}``, then obeys one JSON command per stdin line
``{"id": N, "op": ..., ...}`` and answers ``{"id": N, "ok": bool,
"value"|"error": ...}``. Unprompted lines report what happens: ``{"ev":
"peer", "event": "joined"|"suspect"|"alive"|"dead"|"left", "name", "t"}`` and
``{"ev": "msg", "sid", "subject", "data", "nbytes", "sha256", "sender", "t"}`` (``data``
is None above 64 KiB: compare ``sha256``), and ``{"ev":
"state", "name", "state", "t"}`` for every change of a peer's state in
``node.status()`` (polled every 10 ms, independent of the dispatch thread). ``t`` is
``time.monotonic()``: one clock for every namespace of the machine, so the
test can measure from its own actions. End of stdin or ``quit`` closes the node.

Test side: :class:`LanHost` starts that program and waits on its lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The project's namespace lab (read its header); ZMESH_LAB names one lab instance.
LAB_SH = ROOT / "tests" / "harness" / "netns_lab.sh"

# =========================================================================== host side

_out_lock = threading.Lock()
BIG = 64 * 1024  # messages above this are reported by size and sha256, without their data


def _say(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, default=str)
    with _out_lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            os._exit(3)  # the test is gone: nobody to obey


def _run(node: Any, op: str, cmd: dict[str, Any]) -> Any:
    if op == "subscribe":
        sid = cmd.get("sid") or cmd["pattern"]

        def handler(msg: Any) -> None:
            raw = bytes(msg.data)
            data = raw.decode("utf-8", "replace") if len(raw) <= BIG else None
            _say({"ev": "msg", "sid": sid, "subject": msg.subject, "t": time.monotonic(),
                  "data": data, "nbytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                  "sender": msg.sender})

        node.subscribe(cmd["pattern"], handler)
        return sid
    if op == "publish":
        node.publish(cmd["subject"], cmd.get("data", "").encode(), timeout=cmd.get("timeout", 2.0))
        return True
    if op == "publish_array":
        # ``nbytes`` random bytes with ``marker`` in the middle, as a uint8 numpy array
        # (the tensor path of the wire); returns the sha256 of the array's bytes.
        import numpy as np

        buf = bytearray(os.urandom(cmd["nbytes"]))
        marker = cmd.get("marker", "").encode()
        at = (len(buf) - len(marker)) // 2
        buf[at:at + len(marker)] = marker
        node.publish(cmd["subject"], np.frombuffer(bytes(buf), dtype=np.uint8),
                     timeout=cmd.get("timeout", 5.0))
        return hashlib.sha256(buf).hexdigest()
    if op == "browse":
        # What this host's mDNS sees of the LAN (every cluster), as mesh-status does.
        from discovery.zeroconf import LanBrowser

        with LanBrowser(node.options["interfaces"]) as browser:
            anns = browser.scan(cmd.get("seconds", 1.0))
        return [{"id": a.node_id, "name": a.name, "cluster": a.cluster, "key": a.public_key,
                 "endpoints": list(a.endpoints)} for a in anns]
    if op == "wait_subscribers":
        return node.wait_for_subscribers(cmd["subject"], cmd["count"], timeout=cmd.get("timeout", 10.0))
    if op == "peers":
        return [{"name": p.name, "id": p.id, "state": p.state, "rtt": p.rtt} for p in node.peers()]
    if op == "status":
        return node.status()
    if op == "wait_peers":
        # "wait": call()'s own timeout= is the test side's and never reaches here.
        wait = cmd.get("wait", cmd.get("timeout", 10.0))
        return sorted(p.name for p in node.wait_for_peers(cmd["n"], timeout=wait))
    raise ValueError(f"unknown op {op!r}")


def _watch_states(node: Any, interval: float = 0.01) -> None:
    """Report every peer state change seen in node.status(), independently of on_peer:
    the measurement must not depend on the dispatch thread that runs the callbacks."""
    seen: dict[str, str] = {}
    while True:
        try:
            peers = node.status()["peers"]
        except Exception:
            return  # closed
        now = time.monotonic()
        for p in peers:
            if seen.get(p["name"]) != p["state"]:
                seen[p["name"]] = p["state"]
                _say({"ev": "state", "name": p["name"], "state": p["state"], "t": now})
        time.sleep(interval)


def host_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lanhost")
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--interfaces", default="eth0", help="comma-separated (default: eth0)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="exit by itself after this long, whatever happens to the test")
    parser.add_argument("--secret-file", help="the cluster secret (a key file, mode 600)")
    parser.add_argument("--policy", help="a permission policy file (.json or .toml)")
    parser.add_argument("--seeds", default="", help="comma-separated seed endpoints to dial")
    parser.add_argument("--discovery", default="zeroconf", choices=("zeroconf", "static"),
                        help="static: no mDNS, join through --seeds (--interfaces unused)")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [{args.name}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zeroconf").setLevel(logging.WARNING)
    # A host left behind by a crashed test must not live on.
    threading.Timer(args.max_seconds, lambda: os._exit(4)).start()
    import mesh

    where = {"interfaces": args.interfaces.split(",")} if args.discovery == "zeroconf" else {}
    node = mesh.Node(args.name, cluster=args.cluster, discovery=args.discovery, **where,
                     secret=Path(args.secret_file) if args.secret_file else None,
                     policy=args.policy, seeds=[s for s in args.seeds.split(",") if s])
    node.on_peer(lambda event, info: _say(
        {"ev": "peer", "event": event, "name": info.name, "id": info.id, "t": time.monotonic()}))
    node.start()
    threading.Thread(target=_watch_states, args=(node,), daemon=True).start()
    status = node.status()
    _say({"ev": "ready", "id": node.id, "name": node.name, "pid": os.getpid(),
          "endpoints": status["endpoints"], "secured": status["secured"], "t": time.monotonic()})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                _say({"id": cmd["id"], "ok": True, "value": _run(node, cmd["op"], cmd)})
            except Exception as exc:
                _say({"id": cmd["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        t0 = time.monotonic()
        node.close()
        _say({"ev": "closed", "took": time.monotonic() - t0})
    os._exit(0)  # the failsafe timer thread must not keep us alive


# =========================================================================== test side


def lab(prefix: str, *args: str, timeout: float = 60.0) -> str:
    """Run ``netns_lab.sh ARGS`` for the lab ``prefix``; its stdout. Raises on failure."""
    r = subprocess.run(["bash", str(LAB_SH), *args], env={**os.environ, "ZMESH_LAB": prefix},
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"netns_lab.sh {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class HostError(Exception):
    """The lab host's node failed, died, or did not answer in time."""


class LanHost:
    """Test-side handle of one ``tests.lanhost`` process inside lab host ``index``."""

    def __init__(
        self, prefix: str | None, index: int, name: str, cluster: str, interfaces: str = "eth0",
        *, secret_file: str | os.PathLike | None = None, policy: str | os.PathLike | None = None,
        seeds: Sequence[str] = (), discovery: str = "zeroconf",
    ) -> None:
        """``prefix=None``: run in this namespace instead of a lab host (use interfaces="lo").
        ``secret_file``, ``policy``, ``seeds``, ``discovery``: see host_main's options."""
        self.index = index
        self.name = name
        wrap = ["bash", str(LAB_SH), "exec", str(index)] if prefix is not None else []
        cmd = [*wrap, sys.executable, "-m", "tests.lanhost",
               "--name", name, "--cluster", cluster, "--interfaces", interfaces]
        if secret_file is not None:
            cmd += ["--secret-file", os.fspath(secret_file)]
        if policy is not None:
            cmd += ["--policy", os.fspath(policy)]
        if seeds:
            cmd += ["--seeds", ",".join(seeds)]
        if discovery != "zeroconf":
            cmd += ["--discovery", discovery]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if prefix is not None:
            env["ZMESH_LAB"] = prefix
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        self.pid = self.proc.pid  # netns_lab.sh and `ip netns exec` exec: this is python itself
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []  # every unprompted line, in order
        self.stderr: list[str] = []
        self.info: dict[str, Any] = {}
        self._ids = 0
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._eof = False  # its stdout closed: no more lines will come
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                self.stderr.append(f"(stdout) {line}")
                continue
            with self._cond:
                if "id" in obj and "ev" not in obj:
                    self._replies[obj["id"]] = obj
                else:
                    self.events.append(obj)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def log(self, last: int = 40) -> str:
        return f"--- {self.name} (h{self.index}) stderr:\n" + "".join(self.stderr[-last:])

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first event (seen so far or arriving within ``timeout``) matching ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 0.2))

    def peer_events(self, name: str | None = None, kinds: Sequence[str] = ()) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("ev") == "peer"
                    and (name is None or e["name"] == name) and (not kinds or e["event"] in kinds)]

    def ready(self, timeout: float = 20.0) -> LanHost:
        ev = self.wait_event(lambda e: e.get("ev") == "ready", timeout)
        if ev is None:
            raise HostError(f"{self.name} did not start within {timeout} s\n{self.log()}")
        self.info = ev
        return self

    def call(self, op: str, timeout: float = 15.0, **args: Any) -> Any:
        with self._cond:
            self._ids += 1
            cmd_id = self._ids
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"id": cmd_id, "op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise HostError(f"{self.name} is gone ({exc}); cannot {op}\n{self.log()}") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while cmd_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostError(f"{self.name}: no answer to {op} within {timeout} s\n{self.log()}")
                if self._eof:
                    raise HostError(f"{self.name} exited ({self.proc.returncode}) during {op}\n{self.log()}")
                self._cond.wait(min(left, 0.2))
            reply = self._replies.pop(cmd_id)
        if not reply["ok"]:
            raise HostError(f"{self.name}.{op}({args}): {reply['error']}\n{self.log()}")
        return reply["value"]

    def signal(self, sig: int) -> float:
        """Send ``sig`` to the node's process; the monotonic time just before."""
        t = time.monotonic()
        os.kill(self.pid, sig)
        return t

    def states(self, name: str) -> list[dict[str, Any]]:
        """The state changes of peer ``name`` seen in this node's status, in order."""
        with self._cond:
            return [e for e in self.events if e.get("ev") == "state" and e["name"] == name]

    def state_of(self, name: str) -> str | None:
        got = self.states(name)
        return got[-1]["state"] if got else None

    def quit(self) -> None:
        """Ask the node to close and exit; returns at once (see stop())."""
        if self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            os.kill(self.pid, signal.SIGCONT)  # a stopped process cannot quit
        except OSError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Quit politely, then SIGKILL; bounded, and safe to call twice."""
        if self.proc.poll() is None:
            self.quit()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None and stream is not self.proc.stdout:
                    stream.close()
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    sys.exit(host_main())
