"""``mesh-status``: ask nodes for their status over the mesh's own protocol.

Any ZeroMQ DEALER may connect to a node's ROUTER endpoint and send one frame
``wire.pack(STATUS_REQ, token)``; the node answers ``wire.pack(STATUS, [token,
status])`` without the asker joining the mesh.

    mesh-status --connect tcp://127.0.0.1:40123
    mesh-status --connect tcp://10.0.0.5:40123 --connect tcp://10.0.0.6:40123 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from mesh import wire
from mesh.errors import ProtocolError

PROG = "mesh-status"


# --------------------------------------------------------------------------- finding nodes


def normalise_endpoint(endpoint: str) -> str:
    """Accept ``host:port`` as a shorthand for ``tcp://host:port``."""
    return endpoint if "://" in endpoint else f"tcp://{endpoint}"


def discover(cluster: str | None, timeout: float) -> list[str]:
    """Endpoints of the nodes found on the LAN.

    LAN discovery (zeroconf) is not available yet: nothing is found, and main()
    asks for --connect. When it lands, browse here and return one endpoint per node.
    """
    return []


def collect(endpoints: Iterable[str], timeout: float = 2.0) -> list[dict]:
    """Ask every endpoint for its node's status, all at once; wait up to ``timeout``.

    Returns the status dict of each node that answered, in the order of
    ``endpoints``, with ``"queried"`` set to the endpoint that answered. A node
    reached through several endpoints is listed once.
    """
    return _collect(endpoints, timeout)[0]


def _collect(endpoints: Iterable[str], timeout: float) -> tuple[list[dict], set[str]]:
    """collect(), plus the set of endpoints that answered."""
    endpoints = list(dict.fromkeys(normalise_endpoint(ep) for ep in endpoints))
    ctx = zmq.Context()  # our own: never disturb the sockets of a node in this process
    socks: dict[Any, tuple[str, int]] = {}
    answers: dict[str, dict] = {}
    try:
        poller = zmq.Poller()
        for endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # A fresh identity: the node must not mistake us for one of its peers.
            sock.setsockopt(zmq.IDENTITY, f"status/{uuid.uuid4().hex}".encode())
            try:
                sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)
                continue  # not an endpoint zmq understands: simply no answer
            token = random.getrandbits(62)
            # The request waits in the socket's queue until the connection is up.
            sock.send(wire.pack(wire.STATUS_REQ, token), zmq.NOBLOCK)
            socks[sock] = (endpoint, token)
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while len(answers) < len(socks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for sock, _ in poller.poll(int(remaining * 1000) + 1):
                endpoint, token = socks[sock]
                status = _parse_answer(sock.recv_multipart(zmq.NOBLOCK), token)
                if status is not None and endpoint not in answers:
                    status["queried"] = endpoint
                    answers[endpoint] = status
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
    out: list[dict] = []
    seen: set[str] = set()
    for endpoint in endpoints:
        status = answers.get(endpoint)
        if status is not None and status.get("id") not in seen:
            seen.add(status.get("id"))
            out.append(status)
    return out, set(answers)


def _parse_answer(frames: list[bytes], token: int) -> dict | None:
    """The status dict in a well-formed answer to our token; None for anything else."""
    if len(frames) != 1:
        return None
    try:
        header = wire.unpack(frames[0])
    except ProtocolError:
        return None
    body = header[2]
    if header[1] != wire.STATUS or type(body) is not list or len(body) != 2:
        return None
    if body[0] != token or type(body[1]) is not dict:
        return None
    return body[1]


# --------------------------------------------------------------------------- formatting


def _si(value: float, unit: str = "") -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def _bytes(value: float) -> str:
    for threshold, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.1f} {suffix}"
    return f"{value:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _endpoints(status: dict) -> list[str]:
    eps = status.get("endpoints") or {}
    # inproc is only reachable from inside the node's own process; tcp first, loopback first.
    out = [ep for kind, lst in eps.items() if kind != "inproc" for ep in lst]
    out.sort(key=lambda ep: (not ep.startswith("tcp://"), "//127." not in ep and "//localhost" not in ep))
    return out or ["-"]


def _peers(status: dict) -> list[str]:
    rows = []
    for p in status.get("peers") or []:
        rtt = f" {_duration(p.get('rtt'))}" if p.get("rtt") is not None else ""
        rows.append(f"{p.get('name', '?')} {p.get('transport') or '-'} {p.get('state', '?')}{rtt}")
    return rows or ["-"]


def _subscriptions(status: dict) -> list[str]:
    rows = []
    for s in status.get("subscriptions") or []:
        queue = f" [{s['queue']}]" if s.get("queue") else ""
        rows.append(f"{s.get('pattern')}{queue} ({s.get('delivered', 0)})")
    return rows or ["-"]


def _drops(counters: dict) -> list[str]:
    drops = counters.get("drops") or {}
    total = sum(drops.values()) + (counters.get("gaps") or 0)
    if not total:
        return ["0"]
    detail = [f"{k}:{v}" for k, v in sorted(drops.items())]
    if counters.get("gaps"):
        detail.append(f"gaps:{counters['gaps']}")
    return [str(total), *detail]


COLUMNS = (
    "NAME", "HOST", "UPTIME", "ENDPOINTS", "PEERS (transport state rtt)",
    "SUBSCRIPTIONS (delivered)", "MSGS IN/OUT", "BYTES IN/OUT", "DROPS", "LATENCY p50/p99",
)


def row(status: dict) -> list[list[str]]:
    """One table row for a node; each cell is a list of lines."""
    c = status.get("counters") or {}
    lat = status.get("latency") or {}
    return [
        [str(status.get("name", "?"))],
        [f"{status.get('host', '?')}:{status.get('pid', '?')}"],
        [_duration(status.get("uptime"))],
        _endpoints(status),
        _peers(status),
        _subscriptions(status),
        [f"{_si(c.get('msgs_in', 0))}/{_si(c.get('msgs_out', 0))}"],
        [f"{_bytes(c.get('bytes_in', 0))}/{_bytes(c.get('bytes_out', 0))}"],
        _drops(c),
        [f"{_duration(lat.get('p50'))}/{_duration(lat.get('p99'))}"],
    ]


def format_table(statuses: Sequence[dict]) -> str:
    """A plain-text table, one (multi-line) row per node."""
    rows = [row(s) for s in statuses]
    widths = [len(h) for h in COLUMNS]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], *(len(line) for line in cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(text.ljust(widths[i]) for i, text in enumerate(cells)).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    for r in rows:
        for k in range(max(len(cell) for cell in r)):
            out.append(line([cell[k] if k < len(cell) else "" for cell in r]))
    return "\n".join(out)


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask mesh nodes for their status (peers, transports, subscriptions, "
        "traffic, drops, latency) and print a table.",
        epilog="examples:\n"
        "  mesh-status --connect tcp://127.0.0.1:40123\n"
        "  mesh-status --connect 10.0.0.5:40123 --connect 10.0.0.6:40123 --json\n\n"
        "The endpoint is any of the node's: `mesh sub` prints one (\"listening on ...\").\n"
        "Exit code 0 when at least one node answered, 1 when none did.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--connect", "-c", action="append", metavar="ENDPOINT",
        help="a node's endpoint, e.g. tcp://10.0.0.5:40123 or 10.0.0.5:40123 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the status dicts as JSON")
    parser.add_argument(
        "--timeout", type=float, default=2.0, metavar="S",
        help="how long to wait for answers (default: %(default)s)",
    )
    parser.add_argument("--cluster", help="only show nodes of this cluster")
    parser.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="S",
        help="refresh every S seconds (default 2) until Ctrl-C",
    )
    return parser


def _report(args: argparse.Namespace, endpoints: list[str]) -> int:
    statuses, answered = _collect(endpoints, args.timeout)
    others = 0
    if args.cluster:
        kept = [s for s in statuses if s.get("cluster") == args.cluster]
        others, statuses = len(statuses) - len(kept), kept
    if args.json:
        print(json.dumps(statuses, indent=2, sort_keys=True), flush=True)
    elif statuses:
        print(format_table(statuses), flush=True)
    for endpoint in endpoints:
        if normalise_endpoint(endpoint) not in answered:
            print(f"{PROG}: no answer from {endpoint} within {args.timeout} s", file=sys.stderr)
    if not statuses:
        if others:
            msg = f"no node of cluster {args.cluster!r} answered ({others} of other clusters did)"
        else:
            msg = "no node answered"
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoints = list(args.connect or []) or discover(args.cluster, args.timeout)
    if not endpoints:
        print(
            f"{PROG}: no node to ask: finding nodes on the LAN (zeroconf) is not available "
            "yet; pass --connect ENDPOINT (e.g. the \"listening on tcp://...\" line printed "
            "by `mesh sub`)",
            file=sys.stderr,
        )
        return 1
    try:
        if args.watch is None:
            return _report(args, endpoints)
        while True:
            print("\x1b[2J\x1b[H" if sys.stdout.isatty() else "", end="")
            print(time.strftime("%H:%M:%S"), flush=True)
            _report(args, endpoints)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130 if args.watch is None else 0
    except BrokenPipeError:
        # `mesh-status ... | head`: the reader left; not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
