"""``mesh-status``: find mesh nodes and ask each for its status over the mesh's own protocol.

Without ``--connect`` it browses the LAN with mDNS / DNS-SD for the mesh's
service type (every cluster, unless ``--cluster``), then asks every node found
at the tcp endpoint it advertises. It announces nothing itself, so it works
from a host that runs no node. Any ZeroMQ DEALER may connect to a node's
ROUTER endpoint and send one frame ``wire.pack(STATUS_REQ, token)``; the node
answers ``wire.pack(STATUS, [token, status])`` without the asker joining the mesh.

    mesh-status                                   # every node on the LAN
    mesh-status --cluster exp-42 --watch          # one cluster, refreshed every 2 s
    mesh-status --interfaces lo --json            # mDNS on loopback only (tests)
    mesh-status --connect tcp://10.0.0.5:40123    # one node, no mDNS at all
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
from dataclasses import dataclass
from typing import Any

import zmq

from mesh import wire
from mesh.errors import MeshError, ProtocolError

PROG = "mesh-status"


# --------------------------------------------------------------------------- finding nodes


def normalise_endpoint(endpoint: str) -> str:
    """Accept ``host:port`` as a shorthand for ``tcp://host:port``."""
    return endpoint if "://" in endpoint else f"tcp://{endpoint}"


@dataclass
class Target:
    """A node to ask: answered when any of its endpoints did."""

    label: str  # how the user knows it: an endpoint, or "name (cluster)"
    endpoints: list[str]
    node_id: str | None = None
    cluster: str | None = None
    public_key: str = ""  # announced CURVE key: the node is secured


def _is_loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    return host.startswith("127.") or host == "localhost"


def query_endpoints(ann: Any, here_host: str) -> list[str]:
    """Where to ask an announced node: on its own host loopback (and ipc) first;
    from another host only its routable tcp addresses (our loopback is not its)."""
    tcp = [ep for ep in ann.endpoints if ep.startswith("tcp://")]
    if ann.host and ann.host == here_host:
        ipc = [ep for ep in ann.endpoints if ep.startswith("ipc://")]
        return sorted(tcp, key=lambda ep: not _is_loopback_endpoint(ep)) + ipc
    return [ep for ep in tcp if not _is_loopback_endpoint(ep)]


def targets_from_announcements(anns: Iterable[Any], cluster: str | None = None) -> list[Target]:
    from transports.base import Locality

    here = Locality.here().host
    out = []
    for ann in anns:
        if cluster is not None and ann.cluster != cluster:
            continue
        eps = query_endpoints(ann, here)
        if eps:
            out.append(Target(f"{ann.name or ann.node_id} (cluster {ann.cluster!r})", eps,
                              ann.node_id, ann.cluster, ann.public_key))
    return out


def discover(
    cluster: str | None = None,
    browse: float = 1.0,
    interfaces: Sequence[str] | None = None,
) -> list[Target]:
    """The nodes announced on the LAN (of ``cluster``, or of every cluster).

    Asks with mDNS on ``interfaces`` (default: every non-loopback IPv4
    interface) for ``browse`` seconds; responders answer in milliseconds, the
    time is there to ask again when a packet was lost.
    """
    from discovery.zeroconf import LanBrowser

    with LanBrowser(interfaces) as browser:
        return targets_from_announcements(browser.scan(browse), cluster)


def collect(endpoints: Iterable[str], timeout: float = 2.0, keys: Any = None) -> list[dict]:
    """Ask every endpoint for its node's status, all at once; wait up to ``timeout``.

    Returns the status dict of each node that answered, in the order of
    ``endpoints``, with ``"queried"`` set to the endpoint that answered. A node
    reached through several endpoints is listed once. ``keys`` (a
    mesh.security.ClusterKeys, or a dict endpoint -> ClusterKeys) asks secured
    nodes over CurveZMQ.
    """
    return _collect(endpoints, timeout, keys)[0]


def _collect(endpoints: Iterable[str], timeout: float, keys: Any = None) -> tuple[list[dict], set[str]]:
    """collect(), plus the set of endpoints that answered."""
    endpoints = list(dict.fromkeys(normalise_endpoint(ep) for ep in endpoints))
    if not isinstance(keys, dict):
        keys = dict.fromkeys(endpoints, keys)
    keys = {normalise_endpoint(ep): k for ep, k in keys.items()}
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
            if keys.get(endpoint) is not None:
                keys[endpoint].apply_client(sock)
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
    "NAME", "CLUSTER", "HOST", "UPTIME", "SECURED", "ENDPOINTS", "PEERS (transport state rtt)",
    "SUBSCRIPTIONS (delivered)", "MSGS IN/OUT", "BYTES IN/OUT", "DROPS", "LATENCY p50/p99",
)


def _secured(status: dict) -> list[str]:
    sec = status.get("security")
    if not status.get("secured") or not isinstance(sec, dict):
        return ["no"]
    refused = sum(v for v in (sec.get("refused") or {}).values() if isinstance(v, int))
    return [f"curve {sec.get('key', '?')}"] + ([f"refused {refused}"] if refused else [])


def row(status: dict) -> list[list[str]]:
    """One table row for a node; each cell is a list of lines."""
    c = status.get("counters") or {}
    lat = status.get("latency") or {}
    return [
        [str(status.get("name", "?"))],
        [str(status.get("cluster", "?"))],
        [f"{status.get('host', '?')}:{status.get('pid', '?')}"],
        [_duration(status.get("uptime"))],
        _secured(status),
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
        description="Find mesh nodes on the LAN (mDNS) or at given endpoints, ask each for its "
        "status (peers, transports, subscriptions, traffic, drops, latency) and print a table.",
        epilog="examples:\n"
        "  mesh-status                                  # every node of every cluster on the LAN\n"
        "  mesh-status --cluster exp-42 --watch         # one cluster, refreshed every 2 s\n"
        "  mesh-status --interfaces eth1 --json         # browse eth1 only (multi-NIC hosts)\n"
        "  mesh-status --interfaces lo                  # nodes started with interfaces=[\"lo\"]\n"
        "  mesh-status --connect tcp://127.0.0.1:40123  # ask one node directly, no mDNS\n"
        "  mesh-status --connect 10.0.0.5:40123 --connect 10.0.0.6:40123\n\n"
        "Without --connect, mDNS queries go out on --interfaces (default: every non-loopback\n"
        "IPv4 interface). On a shared machine, tests and demos keep mDNS on loopback with\n"
        "--interfaces lo (as `mesh demo` does) so that it never leaves the machine.\n"
        "An endpoint is any of a node's: `mesh sub` prints one (\"listening on ...\").\n"
        "Exit code 0 when at least one node answered, 1 when none did.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--connect", "-c", action="append", metavar="ENDPOINT",
        help="a node's endpoint, e.g. tcp://10.0.0.5:40123 or 10.0.0.5:40123 (repeatable); "
        "no LAN discovery then",
    )
    parser.add_argument("--json", action="store_true", help="print the status dicts as JSON")
    parser.add_argument(
        "--timeout", type=float, default=2.0, metavar="S",
        help="how long to wait for answers (default: %(default)s)",
    )
    parser.add_argument("--cluster", metavar="NAME", help="only show nodes of this cluster")
    parser.add_argument(
        "--interfaces", "-i", action="append", metavar="IF[,IF...]",
        help="run mDNS only on these interfaces (names or IPv4 addresses, repeatable); "
        "default: every non-loopback IPv4 interface",
    )
    parser.add_argument(
        "--browse", type=float, default=1.0, metavar="S",
        help="how long to ask with mDNS (3 queries) before asking the nodes (default: %(default)s)",
    )
    parser.add_argument(
        "--secret-file", metavar="PATH",
        help="the cluster credential of secured nodes (a file, mode 600); or set ZMESH_SECRET",
    )
    parser.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="S",
        help="refresh in place every S seconds (default 2) until Ctrl-C",
    )
    return parser


def _interfaces(args: argparse.Namespace) -> list[str] | None:
    if not args.interfaces:
        return None
    return [i.strip() for item in args.interfaces for i in item.split(",") if i.strip()]


def _secret(args: argparse.Namespace) -> Any:
    """The credential given on the command line or in the environment, or None."""
    if args.secret_file:
        import pathlib

        return pathlib.Path(args.secret_file)
    return os.environ.get("ZMESH_SECRET") or None


def _keys_for(args: argparse.Namespace, targets: list[Target], err: list[str]) -> tuple[list[Target], dict]:
    """The targets we can ask, and the CURVE keys to ask each endpoint with."""
    from mesh.security import cluster_keys

    secret = _secret(args)
    derived: dict[str, Any] = {}

    def keys_of(cluster: str) -> Any:  # derived once per cluster, not per target
        if cluster not in derived:
            derived[cluster] = cluster_keys(secret, cluster)
        return derived[cluster]

    keys: dict[str, Any] = {}
    kept = []
    for t in targets:
        if args.connect:  # no announcement: secured when we hold a credential
            if secret is not None:
                keys.update(dict.fromkeys(t.endpoints, keys_of(args.cluster or "default")))
        elif t.public_key:
            if secret is None:
                err.append(f"{PROG}: {t.label} is secured (CurveZMQ): pass --secret-file PATH "
                           "or set ZMESH_SECRET to ask it")
                continue
            cluster_key = keys_of(t.cluster or "default")
            if cluster_key.public.decode() != t.public_key:
                err.append(f"{PROG}: {t.label} is secured with another credential than ours; not asked")
                continue
            keys.update(dict.fromkeys(t.endpoints, cluster_key))
        kept.append(t)
    return kept, keys


def _report(args: argparse.Namespace, targets: list[Target], out: list[str], err: list[str]) -> int:
    """Ask ``targets``; the table (or JSON) goes to ``out``, complaints to ``err``."""
    targets, keys = _keys_for(args, targets, err)
    endpoints = [ep for t in targets for ep in t.endpoints]
    statuses, answered = _collect(endpoints, args.timeout, keys)
    others = 0
    if args.cluster:
        kept = [s for s in statuses if s.get("cluster") == args.cluster]
        others, statuses = len(statuses) - len(kept), kept
    if not args.connect:
        statuses.sort(key=lambda s: (str(s.get("cluster")), str(s.get("name")), str(s.get("id"))))
    if args.json:
        out.append(json.dumps(statuses, indent=2, sort_keys=True))
    elif statuses:
        out.append(format_table(statuses))
    for t in targets:
        if not any(normalise_endpoint(ep) in answered for ep in t.endpoints):
            where = "" if t.label in t.endpoints else f" at {', '.join(t.endpoints)}"
            err.append(f"{PROG}: no answer from {t.label}{where} within {args.timeout} s")
    if not statuses:
        if others:
            msg = f"no node of cluster {args.cluster!r} answered ({others} of other clusters did)"
        else:
            msg = "no node answered"
        err.append(f"{PROG}: {msg}")
        return 1
    return 0


def _nobody_msg(args: argparse.Namespace, where: list[str]) -> str:
    of = f" of cluster {args.cluster!r}" if args.cluster else ""
    return (
        f"{PROG}: no mesh node{of} announced itself on {', '.join(where)} within {args.browse} s "
        "(mDNS); check --interfaces, or pass --connect ENDPOINT (e.g. the \"listening on "
        "tcp://...\" line printed by `mesh sub`)"
    )


def _emit(out: list[str], err: list[str], clear: bool) -> None:
    if clear:
        # Refresh in place (home, clear screen) in one write, so the screen never shows
        # half a table; complaints go under the table, or the clear would wipe them.
        print("\x1b[H\x1b[2J" + "\n".join(out + ([""] + err if err else [])), flush=True)
        return
    if err:
        print("\n".join(err), file=sys.stderr, flush=True)
    print("\n".join(out), flush=True)


def _live(live: Any) -> Any:
    """A rich Live display (started once) for --watch on a terminal."""
    if live is None:
        from rich.live import Live

        live = Live(auto_refresh=False)
        live.start()
    return live


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        parser.error("--watch takes a positive number of seconds")
    if not args.browse >= 0:
        parser.error("--browse takes a number of seconds")
    browser: Any = None
    live: Any = None
    code = 1
    try:
        if args.connect:
            targets = [Target(ep, [ep]) for ep in args.connect]
            where: list[str] = []
        else:
            from discovery.zeroconf import LanBrowser

            browser = LanBrowser(_interfaces(args))
            browser.start()
            where = browser.addresses
        while True:
            out: list[str] = []
            err: list[str] = []
            if browser is not None:
                targets = targets_from_announcements(browser.scan(args.browse), args.cluster)
            if args.watch is not None:
                out.append(f"{PROG} {time.strftime('%H:%M:%S')} (every {args.watch:g} s, Ctrl-C to stop)")
            if targets:
                code = _report(args, targets, out, err)
            else:
                err.append(_nobody_msg(args, where))
                code = 1
                if args.json:
                    out.append("[]")
            if args.watch is None:
                _emit(out, err, clear=False)
                return code
            if sys.stdout.isatty():
                live = _live(live)
                # rich redraws the same region in place, without clearing the screen.
                from rich.text import Text

                live.update(Text("\n".join(out + err)), refresh=True)
            else:
                _emit(out, err, clear=False)  # piped: one table after another
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130 if args.watch is None else code
    except BrokenPipeError:
        # `mesh-status ... | head`: the reader left; not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except MeshError as exc:  # e.g. an unknown --interfaces name
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if live is not None:
            live.stop()
        if browser is not None:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
