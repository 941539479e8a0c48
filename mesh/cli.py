"""The ``mesh`` command: publish, subscribe, request and reply from a shell.

For people used to the ``nats`` CLI, except that there is no server: each
command starts a node that joins the mesh like any other worker.

    mesh sub 'grad.>' --count 3             # prints: listening on tcp://127.0.0.1:PORT
    mesh pub grad.w1.l0 hello --seed tcp://127.0.0.1:PORT
    mesh reply ps.pull 'pong {{data}}'
    mesh req ps.pull ping --seed tcp://127.0.0.1:PORT
    mesh demo
    mesh bench                              # throughput and latency on this machine
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from mesh.argtypes import non_negative_int as _non_negative_int
from mesh.argtypes import positive_float as _positive_float
from mesh.argtypes import positive_int as _positive_int
from mesh.endpoints import seedable_endpoints
from mesh.errors import ConfigError, MeshError, NoRespondersError, TimeoutError
from mesh.message import Message

PROG = "mesh"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM

_EXAMPLES = {
    "pub": """\
examples:
  mesh pub grad.w1.layer0 hello --seed tcp://127.0.0.1:40123
  mesh pub jobs.eval 'job {{count}}' --count 10 --wait-subscribers 2 --seed tcp://10.0.0.5:40123

{{count}} in DATA is replaced by the message number (1, 2, ...).
The message is sent only once --wait-subscribers nodes have interest in SUBJECT
(so it is not lost while the mesh is forming); --wait-subscribers 0 sends at once.""",
    "sub": """\
examples:
  mesh sub 'grad.>'                          # every subject under grad.
  mesh sub 'grad.*.layer0' --count 5         # exit after 5 messages
  mesh sub 'jobs.>' --queue workers          # share the work with other members

Prints "listening on tcp://127.0.0.1:PORT" first: pass that to --seed of other commands.""",
    "req": """\
examples:
  mesh req params.pull layer0 --seed tcp://127.0.0.1:40123
  mesh req params.pull layer0 --timeout 0.5 --retries 3 --seed tcp://127.0.0.1:40123

Exit code 1 when nobody answers (no responder, or timeout after the retries).""",
    "reply": """\
examples:
  mesh reply params.pull 'v42'
  mesh reply echo.> 'you said {{data}} on {{subject}}' --count 1

{{data}} and {{subject}} in DATA are replaced by the request's data and subject.""",
    "demo": """\
examples:
  mesh demo                       # 4 worker processes for about 20 s
  mesh demo --workers 6 --duration 10

Starts a parameter server and trainers as separate processes on this machine,
shows gradients, parameter pulls and queue-group jobs flowing, then the status
of every node, and stops everything by itself.""",
    "bench": """\
examples:
  mesh bench                                   # pub/sub, then request/reply, over ipc
  mesh bench --mode pubsub --msgs 200000 --size 1024 --pub 2 --sub 2
  mesh bench --mode request --transport tcp --json
  mesh bench --mode pubsub --array --size 4194304 --msgs 500   # 4 MiB numpy arrays

Starts the publishers and subscribers (requesters and responders) as separate
processes on this machine, shows a progress line while they run, then prints
msgs/s, MB/s (10^6 bytes), request latency p50/p90/p99 and how many messages
arrived of those published (publish waits for credit: none may be lost).
Exit code 0 when every message arrived, non-zero with the reason otherwise;
Ctrl-C stops every process it started.""",
    "secret": """\
examples:
  mesh secret > cluster.key && chmod 600 cluster.key
  mesh sub 'grad.>' --secret-file cluster.key
  ZMESH_SECRET=$(cat cluster.key) mesh pub grad.w1 hi --seed tcp://10.0.0.5:40123

Every node of a cluster holding the same secret talks CurveZMQ (authenticated,
encrypted); nodes without it are refused. See README "Security".""",
}


# --------------------------------------------------------------------------- helpers


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so nodes still say goodbye."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise _Terminated()


def format_data(msg: Message, limit: int = 200) -> str:
    """A one-line rendering of a payload: text as is, arrays summarised, binary as repr."""
    try:
        array = msg.array()
    except MeshError:
        array = None  # plain bytes
    if array is not None:
        import numpy as np

        preview = np.array2string(
            array.reshape(-1)[:6], precision=4, separator=", ", suppress_small=True
        )
        more = " ..." if array.size > 6 else ""
        return f"<array {array.dtype} shape={tuple(array.shape)}> {preview}{more}"
    data = bytes(msg.data)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = repr(data)  # binary
    else:
        if not text.isprintable():
            text = repr(text)  # newlines and control characters stay on one line
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(data)} bytes)"
    return text


def _print(*args: Any) -> None:
    # Always flush: output is often piped (tests, `| grep`) and must show at once.
    print(*args, flush=True)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _substitute(template: str, **values: Any) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", str(value))
    return template


# --------------------------------------------------------------------------- the node


def _default_name(command: str) -> str:
    return f"{command}-{socket.gethostname()}-{os.getpid()}"


def _open_node(args: argparse.Namespace) -> Any:
    import mesh
    from mesh.node import DEFAULT_LISTEN

    discovery = args.discovery or ("static" if args.seed else "none")
    node = mesh.Node(
        name=args.name or _default_name(args.command),
        cluster=args.cluster,
        discovery=discovery,
        seeds=args.seed or (),
        listen=args.listen or DEFAULT_LISTEN,
        secret=_secret(args),
        policy=args.policy,
    )
    try:
        node.start()
    except MeshError:
        raise
    except Exception as exc:
        # e.g. zeroconf failing on this network: say so in one line (-v shows the cause).
        node.close()
        raise ConfigError(f"cannot start the node with --discovery {discovery}: {exc}") from exc
    if args.verbose:
        _err(f"node {node.name} (cluster {node.cluster!r}, discovery {discovery}) started")
    return node


def _secret(args: argparse.Namespace) -> Any:
    """--secret-file, else $ZMESH_SECRET, else None (an unsecured node)."""
    if args.secret_file:
        return pathlib.Path(args.secret_file)
    return os.environ.get("ZMESH_SECRET") or None


def cmd_bench(args: argparse.Namespace) -> int:
    from mesh import benchcmd

    return benchcmd.run(benchcmd.options_from(args))


def cmd_secret(args: argparse.Namespace) -> int:
    from mesh.security import generate_secret

    _print(generate_secret())
    return 0


def _peer_names(node: Any) -> dict[str, str]:
    # status() also lists peers that already left: a quick `mesh pub` is gone by now.
    names = {p["id"]: p["name"] for p in node.status()["peers"]}
    names[node.id] = node.name
    return names


def _announce(node: Any) -> None:
    eps = seedable_endpoints(node.status())
    if eps:
        also = f" (also {', '.join(eps[1:])})" if len(eps) > 1 else ""
        _print(f"listening on {eps[0]}{also}")


def _wait_joined(node: Any, args: argparse.Namespace, timeout: float) -> None:
    """With seeds, fail clearly when none answers instead of "no responders"."""
    if not args.seed:
        return
    try:
        node.wait_for_peers(1, timeout=timeout)
    except TimeoutError:
        raise _not_joined(args, timeout) from None


def _not_joined(args: argparse.Namespace, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"could not join the mesh through {', '.join(args.seed)} within {timeout} s; "
        f"check the endpoint and that it uses --cluster {args.cluster}"
    )


# --------------------------------------------------------------------------- commands


def cmd_pub(args: argparse.Namespace) -> int:
    node = _open_node(args)
    try:
        if args.wait_subscribers > 0:
            try:
                node.wait_for_subscribers(args.subject, args.wait_subscribers, timeout=args.timeout)
            except TimeoutError:
                if args.seed and not node.peers():
                    raise _not_joined(args, args.timeout) from None  # the seed is the problem
                alone = not args.seed and node.discovery_mode == "none"
                hint = " (no --seed given: pass one to reach other nodes)" if alone else ""
                raise TimeoutError(
                    f"fewer than {args.wait_subscribers} subscriber(s) for {args.subject!r} "
                    f"after {args.timeout} s, nothing sent{hint}; use --wait-subscribers 0 "
                    "to publish anyway"
                ) from None
        for n in range(1, args.count + 1):
            data = _substitute(args.data, count=n).encode()
            node.publish(args.subject, data)
            _print(f'Published {len(data)} bytes to "{args.subject}"')
            if args.interval and n < args.count:
                time.sleep(args.interval)
    finally:
        node.close()  # the goodbye lingers briefly so queued messages still leave
    return 0


def cmd_sub(args: argparse.Namespace) -> int:
    node = _open_node(args)
    try:
        sub = node.subscribe(args.pattern, queue=args.queue)
        _announce(node)
        group = f" in queue group {args.queue!r}" if args.queue else ""
        _print(f'Subscribing on "{args.pattern}"{group}')
        deadline = time.monotonic() + args.timeout if args.timeout else None
        received = 0
        names: dict[str, str] = {}
        while args.count is None or received < args.count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                # Short waits so Ctrl-C and --timeout are noticed promptly.
                msg = sub.next(timeout=wait)
            except TimeoutError:
                continue
            received += 1
            if msg.sender not in names:
                names = _peer_names(node)
            sender = names.get(msg.sender, msg.sender)
            _print(
                f'[#{received}] Received on "{msg.subject}" (seq {msg.seq} from {sender}) : '
                f"{format_data(msg)}"
            )
        if args.count is not None and received < args.count:
            _err(f"{PROG} sub: received {received} of {args.count} message(s) within {args.timeout} s")
            return 1
    finally:
        node.close()
    return 0


def cmd_req(args: argparse.Namespace) -> int:
    node = _open_node(args)
    try:
        _wait_joined(node, args, max(args.timeout, 2.0))
        if args.seed or node.discovery_mode != "none":
            # Interest from nodes met through gossip arrives a moment after the seed's.
            try:
                node.wait_for_subscribers(args.subject, 1, timeout=min(args.timeout, 1.0))
            except TimeoutError:
                pass  # request() below says "no responders" clearly
        try:
            start = time.perf_counter()
            reply = node.request(args.subject, args.data.encode(), timeout=args.timeout, retries=args.retries)
            elapsed = time.perf_counter() - start
        except NoRespondersError:
            where = f"reachable through {', '.join(args.seed)}" if args.seed else "(no --seed given)"
            raise NoRespondersError(
                f'no responders for "{args.subject}" in the mesh {where}; '
                f"start one, e.g.: mesh reply {args.subject} DATA"
            ) from None
        except TimeoutError:
            raise TimeoutError(
                f'no reply on "{args.subject}" after {args.retries + 1} attempt(s) of '
                f"{args.timeout} s; the responder may be slow or gone (raise --timeout/--retries)"
            ) from None
        sender = _peer_names(node).get(reply.sender, reply.sender)
        _print(f'Received reply from {sender} in {elapsed * 1000:.2f} ms : {format_data(reply)}')
    finally:
        node.close()
    return 0


def cmd_reply(args: argparse.Namespace) -> int:
    node = _open_node(args)
    try:
        sub = node.subscribe(args.subject, queue=args.queue)
        _announce(node)
        _print(f'Listening for requests on "{args.subject}"')
        answered = 0
        while args.count is None or answered < args.count:
            try:
                msg = sub.next(timeout=0.5)
            except TimeoutError:
                continue
            if not msg.is_request:
                _print(f'ignored a plain message on "{msg.subject}" (not a request)')
                continue
            answered += 1
            text = bytes(msg.data).decode(errors="replace")
            out = _substitute(args.data, data=text, subject=msg.subject, count=answered)
            msg.respond(out.encode())
            _print(f'[#{answered}] Received on "{msg.subject}" : {format_data(msg)} -> replied {out!r}')
    finally:
        node.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mesh import demo

    return demo.run(workers=args.workers, duration=args.duration, seeds=args.seeds)


# --------------------------------------------------------------------------- parser


def _node_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("mesh options")
    group.add_argument(
        "--seed",
        "-s",
        action="append",
        metavar="ENDPOINT",
        help="endpoint of a node to join through, e.g. tcp://10.0.0.5:40123 (repeatable)",
    )
    group.add_argument("--cluster", default="default", help="cluster name (default: %(default)s)")
    group.add_argument("--name", help="this node's name (default: COMMAND-HOST-PID)")
    group.add_argument(
        "--listen",
        action="append",
        metavar="ENDPOINT",
        help="endpoint to listen on, e.g. tcp://0.0.0.0:4222 (repeatable; "
        "default: tcp on a free port and ipc)",
    )
    group.add_argument(
        "--discovery",
        choices=("zeroconf", "static", "none"),
        help="how to find nodes (default: static with --seed, else none)",
    )
    group.add_argument(
        "--secret-file", metavar="PATH",
        help="the cluster's secret (CurveZMQ on every link; file mode 600); or set ZMESH_SECRET",
    )
    group.add_argument(
        "--policy", metavar="PATH",
        help="per-subject permissions (JSON or TOML, see README 'Security')",
    )
    _verbose(group)
    return common


def _verbose(parser: Any) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log the mesh's events; tracebacks on errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish, subscribe, request and reply on a brokerless mesh (no server: "
        "each command joins the mesh as a node).",
        epilog="Run 'mesh COMMAND --help' for the options and an example of each command.",
    )
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _node_options()
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, help_text: str, parents: Sequence[argparse.ArgumentParser]) -> Any:
        return subs.add_parser(
            name, help=help_text, description=help_text, epilog=_EXAMPLES[name],
            formatter_class=fmt, parents=list(parents),
        )

    p = add("pub", "Publish DATA on SUBJECT.", [common])
    p.add_argument("subject")
    p.add_argument("data", nargs="?", default="", help="the payload ({{count}} is substituted)")
    p.add_argument("--count", type=_positive_int, default=1, help="messages to send (default: 1)")
    p.add_argument("--interval", type=float, default=0.0, metavar="S", help="pause between messages")
    p.add_argument(
        "--wait-subscribers", type=_non_negative_int, default=1, metavar="N",
        help="send only once N nodes subscribe to SUBJECT (default: 1)",
    )
    p.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="S",
        help="how long to wait for the subscribers (default: 5)",
    )
    p.set_defaults(func=cmd_pub)

    p = add("sub", "Subscribe to PATTERN and print what arrives.", [common])
    p.add_argument("pattern", help="subject pattern: * matches one token, > the rest")
    p.add_argument("--count", type=_positive_int, help="exit after N messages")
    p.add_argument("--queue", metavar="GROUP", help="join a queue group (each message to one member)")
    p.add_argument(
        "--timeout", type=_positive_float, metavar="S",
        help="stop after S seconds (exit 1 if --count messages did not arrive)",
    )
    p.set_defaults(func=cmd_sub)

    p = add("req", "Send a request on SUBJECT and print the reply.", [common])
    p.add_argument("subject")
    p.add_argument("data", nargs="?", default="")
    p.add_argument("--timeout", type=_positive_float, default=2.0, metavar="S", help="per attempt (default: 2)")
    p.add_argument("--retries", type=_non_negative_int, default=0, metavar="N", help="extra attempts (default: 0)")
    p.set_defaults(func=cmd_req)

    p = add("reply", "Answer requests on SUBJECT with DATA.", [common])
    p.add_argument("subject", help="subject pattern to answer on")
    p.add_argument("data", help="the reply ({{data}}, {{subject}}, {{count}} are substituted)")
    p.add_argument("--count", type=_positive_int, help="exit after answering N requests")
    p.add_argument("--queue", metavar="GROUP", help="share the requests with other responders")
    p.set_defaults(func=cmd_reply)

    p = add("demo", "Run a small distributed-training mesh on this machine.", [])
    p.add_argument("--workers", type=int, default=4, metavar="N", help="worker processes (default: 4)")
    p.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds (default: 20, at most 60)")
    p.add_argument("--seeds", action="store_true",
                   help="find each other through a seed endpoint instead of zeroconf (mDNS)")
    _verbose(p)
    p.set_defaults(func=cmd_demo)

    p = add("bench", "Measure pub/sub and request/reply between processes of this machine.", [])
    from mesh import benchcmd

    benchcmd.add_arguments(p)
    _verbose(p)
    p.set_defaults(func=cmd_bench)

    p = add("secret", "Print a fresh random cluster secret (for --secret-file or ZMESH_SECRET).", [])
    _verbose(p)
    p.set_defaults(func=cmd_secret)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        pass  # not the main thread (embedded use): leave signals alone
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        # Commands close their node in `finally`: peers drop us at once.
        _err("")
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    except MeshError as exc:
        if args.verbose:
            traceback.print_exc()
        _err(f"{PROG} {args.command}: error: {exc}")
        return 1
    except BrokenPipeError:
        # `mesh sub ... | head`: the reader left; not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
