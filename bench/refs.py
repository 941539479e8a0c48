"""References beside raw pyzmq: Zenoh's Python binding and NATS, and the
side-by-side tables of issues #15 (latency) and #16 (throughput shapes).

Latency (64 B, tcp loopback, round trips, pinned to one core and unpinned):
raw DEALER/ROUTER; Zenoh (peer mode, two processes connected directly over
tcp/127.0.0.1, no scouting) put/subscriber ping-pong whose callbacks answer
directly, and get/queryable; NATS (nats-py through Debian's nats-server on
127.0.0.1) pub/sub ping-pong and request/reply; the mesh with default
(dispatch-thread) handlers, with ``subscribe(..., inline=True)`` handlers
(reported as not supported yet while ``Node.subscribe`` has no ``inline``),
and ``request()``. Goals (issue #15): mesh inline <= 1.5x raw and below Zenoh's
pub/sub; mesh request below Zenoh's get; mesh default handlers <= 2.5x raw.
Beside them, for information, the "Python floor": the mesh's thread shape (an I/O
thread per process, a queue hand-off to the pinging thread) in plain pyzmq.

Throughput (64 B and 1 KiB, tcp loopback, counted at the receiver, nothing
lost: Zenoh publishes with ``CongestionControl.BLOCK``, the mesh with
``publish(timeout=5)``, raw PUSH with a send timeout): one publisher to one
subscriber, 4 publishers to one (fan-in), one publisher to 4 subscribers
(fan-out; raw: one PUSH socket per subscriber). Every process is separate.

Who owns what: each ``*_task`` runs in a worker process (bench._runner) and
owns its Zenoh session / NATS connection for the task's duration, closing it
on the way out; Zenoh's callbacks run on Zenoh's own threads. The parent owns
the nats-server process (``nats_server``: started on a free port, always
stopped) and the pinned worker pair and the crew of the fan shapes (always
closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import zmq
from zmq.backend import zmq_poll

from bench import pubsub
from bench._runner import BenchError, Control, Crew, Pair, crew, log, workers

HERE = __name__
PS = pubsub.HERE
Z_PING, Z_PONG, Z_QUERY, Z_DATA = "bench/ping", "bench/pong", "bench/query", "bench/tp"
N_PING, N_PONG, N_REQ = "bench.ping", "bench.pong", "bench.req"
LAT_SIZE = 64
GOAL_INLINE_RAW = 1.5
GOAL_DEFAULT_RAW = 2.5


# ====================================================================== helpers


def free_port() -> int:
    """A free tcp port on 127.0.0.1 (for servers that cannot report one they picked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _zenoh_config(listen: list[str] | None = None, connect: list[str] | None = None) -> Any:
    """Peer mode, no scouting of any kind: the processes connect exactly where told,
    over loopback, and nothing leaves the machine."""
    import json

    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("scouting/gossip/enabled", "false")
    config.insert_json5("listen/endpoints", json.dumps(listen or []))
    config.insert_json5("connect/endpoints", json.dumps(connect or []))
    return config


def _zenoh_listen() -> tuple[Any, str]:
    """A session listening on a free loopback port (a few tries: the port is
    picked before Zenoh binds it)."""
    import zenoh

    for attempt in range(5):
        endpoint = f"tcp/127.0.0.1:{free_port()}"
        try:
            return zenoh.open(_zenoh_config(listen=[endpoint])), endpoint
        except zenoh.ZError as exc:
            if attempt == 4:
                raise BenchError(f"zenoh: cannot listen on {endpoint}: {exc}") from None
    raise AssertionError("unreachable")


def _wait_zenoh_peers(session: Any, n: int) -> None:
    deadline = time.monotonic() + pubsub.JOIN_TIMEOUT
    while len(session.info.peers_zid()) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"zenoh: {len(session.info.peers_zid())} of {n} peers connected")
        time.sleep(0.01)


# ====================================================================== Zenoh latency


def zenoh_echo_task(ctl: Control, timeout: float) -> dict:
    """Answers pings with pongs and queries with replies, straight from the
    callbacks (Zenoh's own threads)."""
    import zenoh

    session, endpoint = _zenoh_listen()
    with session:
        pong = session.declare_publisher(
            Z_PONG, congestion_control=zenoh.CongestionControl.BLOCK, express=True)
        put = pong.put
        session.declare_subscriber(Z_PING, lambda sample: put(sample.payload))
        session.declare_queryable(Z_QUERY, lambda query: query.reply(query.key_expr,
                                                                     query.payload))
        ctl.send("ready", endpoint)
        ctl.wait_stop(timeout)  # the work happens on Zenoh's threads meanwhile
    return {}


def zenoh_ping_task(
    ctl: Control, endpoint: str, mode: str, size: int, count: int, warmup: int, timeout: float,
) -> dict:
    """``mode`` "pubsub": put a ping, a subscriber callback wakes this thread on
    the pong. "get": ``session.get`` and the first reply."""
    import zenoh

    replies: queue.SimpleQueue = queue.SimpleQueue()
    with zenoh.open(_zenoh_config(connect=[endpoint])) as session:
        _wait_zenoh_peers(session, 1)
        if mode == "get":
            get = session.get

            def send(payload: bytes) -> None:
                reply = get(Z_QUERY, payload=payload, timeout=5.0).recv()
                if reply.ok is None:
                    raise BenchError(f"zenoh get: error reply {reply.err}")

            def recv() -> None:
                return None
        else:
            ping = session.declare_publisher(
                Z_PING, congestion_control=zenoh.CongestionControl.BLOCK, express=True)
            put = replies.put
            session.declare_subscriber(Z_PONG, lambda sample: put(None))
            send = ping.put

            def recv() -> None:
                replies.get(True, 5.0)  # queue.Empty: a lost message, never a hang

        # The echo's subscriber/queryable may be declared to us a moment after the
        # connection: retry the first round trip, then drop stray pongs.
        deadline = time.monotonic() + pubsub.JOIN_TIMEOUT
        while True:
            try:
                send(b"hello")
                if mode != "get":
                    replies.get(True, 0.2)
                break
            except Exception:  # no queryable yet: an error reply, a ZError, a closed channel
                if time.monotonic() > deadline:
                    raise BenchError(f"zenoh {mode}: no answer from the echo") from None
        time.sleep(0.1)
        while not replies.empty():
            replies.get_nowait()
        samples = pubsub._round_trips(send, recv, os.urandom(size), count, warmup)
    return pubsub._one_way_stats(samples)


# ====================================================================== NATS latency


@contextlib.contextmanager
def nats_server(cpus: frozenset[int] | None = None) -> Iterator[str]:
    """Debian's nats-server on 127.0.0.1 and a free port, pinned like the workers
    when ``cpus`` is given; always stopped. Yields its URL."""
    binary = shutil.which("nats-server")
    if binary is None:
        raise BenchError("nats-server is not installed: run `bash bench/setup.sh` (as root, "
                         "it runs apt-get install nats-server)")
    port = free_port()

    def preexec() -> None:
        # Dies with this process even if it is killed outright (Linux PR_SET_PDEATHSIG).
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if cpus:
            # Pinned from its first instruction, so the Go runtime sizes itself to the mask.
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=preexec,
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            if proc.poll() is not None:
                raise BenchError(f"nats-server exited at start (code {proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"nats-server not listening on {port} after 10 s") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def nats_echo_task(ctl: Control, url: str, timeout: float) -> dict:
    """Pings answered with a publish, requests with ``msg.respond``."""
    import nats

    async def main() -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        try:
            async def pong(msg: Any) -> None:
                await nc.publish(N_PONG, msg.data)

            async def respond(msg: Any) -> None:
                await msg.respond(msg.data)

            await nc.subscribe(N_PING, cb=pong)
            await nc.subscribe(N_REQ, cb=respond)
            await nc.flush(timeout=5)
            ctl.send("ready", url)
            deadline = time.monotonic() + timeout
            while not ctl.stop_requested():
                if time.monotonic() > deadline:
                    raise BenchError("nats echo: no stop within the timeout")
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    asyncio.run(main())
    return {}


def nats_ping_task(
    ctl: Control, endpoint: str, mode: str, size: int, count: int, warmup: int, timeout: float,
) -> dict:
    """``mode`` "pubsub": publish a ping, await the pong's future; "request":
    ``nc.request``. Timed in the event loop, as an asyncio user would."""
    import nats

    async def main() -> list[int]:
        nc = await nats.connect(endpoint, allow_reconnect=False, connect_timeout=5)
        try:
            loop = asyncio.get_running_loop()
            waiting: list[asyncio.Future | None] = [None]

            async def on_pong(_msg: Any) -> None:
                fut = waiting[0]
                if fut is not None and not fut.done():
                    fut.set_result(None)

            await nc.subscribe(N_PONG, cb=on_pong)
            await nc.flush(timeout=5)

            async def round_trip(payload: bytes) -> None:
                if mode == "request":
                    await nc.request(N_REQ, payload, timeout=5.0)
                    return
                fut = waiting[0] = loop.create_future()
                await nc.publish(N_PING, payload)
                await asyncio.wait_for(fut, 5.0)

            payload = os.urandom(size)
            pc = time.perf_counter_ns
            for _ in range(warmup):
                await round_trip(payload)
            samples = [0] * count
            for i in range(count):
                t0 = pc()
                await round_trip(payload)
                samples[i] = pc() - t0
            return samples
        finally:
            await nc.close()

    try:
        samples = asyncio.run(main())
    except asyncio.TimeoutError:
        raise BenchError(f"nats {mode}: no answer within 5 s") from None
    return pubsub._one_way_stats(samples)


# ====================================================================== the Python floor

# What the mesh's threads cost in CPython before its engine does anything: the same
# shape in plain pyzmq. Each side has an I/O thread polling its ROUTER (the peer's
# DEALER sends to it); the echo answers from that thread (an inline handler), the
# ping side hands each pong to its main thread through a SimpleQueue (the
# benchmark's pong handler) and publishes from the main thread under a lock (a
# link's). Information beside the goals: the mesh's rows minus this one is what its
# engine adds. Who owns what: each task owns its sockets; the I/O thread its ROUTER
# (and, on the echo side, the DEALER back), the main thread the ping's DEALER.


def _floor_io(router: Any, handle: Any, stop: threading.Event) -> None:
    """The I/O thread: poll the ROUTER, drain what is there, hand each message on."""
    poll = [(router, zmq.POLLIN)]
    recv = router.recv_multipart
    while not stop.is_set():
        if zmq_poll(poll, 100):
            for turn in range(2048):
                if turn and not zmq_poll(poll, 0):
                    break
                handle(recv(zmq.NOBLOCK, copy=False))


def floor_echo_task(ctl: Control, timeout: float) -> dict:
    ctx = pubsub._raw_context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = pubsub._raw_bind(router, "tcp")
    back: list[Any] = []  # the DEALER to the ping side's ROUTER, made on its hello
    stop = threading.Event()

    def handle(frames: list) -> None:
        if frames[1].bytes == b"hello":
            if not back:
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(frames[2].bytes.decode())
                back.append(dealer)
            back[0].send(b"hello")
            return
        back[0].send_multipart([b"pong", frames[2].bytes])

    io = threading.Thread(target=_floor_io, args=(router, handle, stop), name="floor-io")
    io.start()
    try:
        ctl.send("ready", endpoint)
        ctl.wait_stop(timeout)
        return {}
    finally:
        stop.set()
        io.join(5.0)
        for sock in (router, *back):
            sock.close(0)


def floor_ping_task(ctl: Control, endpoint: str, size: int, count: int, warmup: int,
                    timeout: float) -> dict:
    ctx = pubsub._raw_context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    mine = pubsub._raw_bind(router, "tcp")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    replies: queue.SimpleQueue = queue.SimpleQueue()
    put = replies.put
    stop = threading.Event()
    io = threading.Thread(target=_floor_io, args=(router, lambda frames: put(None), stop),
                          name="floor-io")
    io.start()
    lock = threading.Lock()
    send_multipart = dealer.send_multipart

    def send(payload: bytes) -> None:
        with lock:
            send_multipart([b"ping", payload])

    try:
        deadline = time.monotonic() + 10.0
        while True:  # the echo connects back to our ROUTER: retry until it answers
            send_multipart([b"hello", mine.encode()])
            try:
                replies.get(True, 0.2)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError("no answer from the floor echo") from None
        time.sleep(0.1)
        while not replies.empty():
            replies.get_nowait()
        recv = functools.partial(replies.get, True, 5.0)  # queue.Empty: a lost message
        return {str(size): pubsub._one_way_stats(pubsub._round_trips(
            send, recv, os.urandom(size), count, warmup))}
    finally:
        stop.set()
        io.join(5.0)
        router.close(0)
        dealer.close(0)


# ====================================================================== latency, parent side


def inline_supported() -> bool:
    """Does today's Node.subscribe take ``inline=``? (The row appears once it does.)"""
    import mesh

    return "inline" in inspect.signature(mesh.Node.subscribe).parameters


# impl -> (label, server task, client task, server kwargs, client kwargs)
def _latency_impls(nats_url: str) -> dict[str, tuple[str, str, str, dict, dict]]:
    tcp = {"transport": "tcp"}
    inline = {"sub_options": {"inline": True}}
    return {
        "raw": ("raw pyzmq DEALER/ROUTER ping-pong", f"{PS}:raw_echo_task",
                f"{PS}:raw_ping_task", tcp, {**tcp, "sizes": [LAT_SIZE]}),
        # Information, not a goal: the mesh's thread shape in plain pyzmq (see above).
        "floor": ("Python floor: pyzmq, I/O thread + queue hand-off", f"{HERE}:floor_echo_task",
                  f"{HERE}:floor_ping_task", {}, {"size": LAT_SIZE}),
        "zenoh": ("Zenoh pub/sub ping-pong (peer, callbacks)", f"{HERE}:zenoh_echo_task",
                  f"{HERE}:zenoh_ping_task", {}, {"mode": "pubsub", "size": LAT_SIZE}),
        "zenoh-get": ("Zenoh get/queryable", f"{HERE}:zenoh_echo_task",
                      f"{HERE}:zenoh_ping_task", {}, {"mode": "get", "size": LAT_SIZE}),
        "nats": ("NATS pub/sub ping-pong (nats-py, nats-server)", f"{HERE}:nats_echo_task",
                 f"{HERE}:nats_ping_task", {"url": nats_url}, {"mode": "pubsub",
                                                                "size": LAT_SIZE}),
        "nats-request": ("NATS request/reply", f"{HERE}:nats_echo_task",
                         f"{HERE}:nats_ping_task", {"url": nats_url},
                         {"mode": "request", "size": LAT_SIZE}),
        "mesh": ("mesh pub/sub ping-pong, default handlers", f"{PS}:mesh_echo_task",
                 f"{PS}:mesh_ping_task", tcp, {**tcp, "sizes": [LAT_SIZE]}),
        "mesh-inline": ("mesh pub/sub ping-pong, inline=True handlers",
                        f"{PS}:mesh_echo_task", f"{PS}:mesh_ping_task", {**tcp, **inline},
                        {**tcp, **inline, "sizes": [LAT_SIZE]}),
        "mesh-request": ("mesh request/reply", f"{PS}:mesh_echo_task", f"{PS}:mesh_ping_task",
                         {**tcp, "mode": "request"},
                         {**tcp, "mode": "request", "sizes": [LAT_SIZE]}),
        # As Zenoh's queryable answers from its callback: information beside the goal row.
        "mesh-request-inline": ("mesh request/reply, inline=True responder",
                                f"{PS}:mesh_echo_task", f"{PS}:mesh_ping_task",
                                {**tcp, **inline, "mode": "request"},
                                {**tcp, "mode": "request", "sizes": [LAT_SIZE]}),
    }


LATENCY_ORDER = ["raw", "floor", "zenoh", "zenoh-get", "nats", "nats-request", "mesh", "mesh-inline",
                 "mesh-request", "mesh-request-inline"]
NEEDS_INLINE = ("mesh-inline", "mesh-request-inline")
# (mesh impl, reference impl, goal ratio, comparison, goal text) of issue #15.
LATENCY_GOALS = [
    ("mesh-inline", "raw", GOAL_INLINE_RAW, "<=", f"p50 <= {GOAL_INLINE_RAW}x raw"),
    ("mesh-inline", "zenoh", 1.0, "<", "p50 < Zenoh pub/sub"),
    ("mesh-request", "zenoh-get", 1.0, "<", "p50 < Zenoh get"),
    ("mesh", "raw", GOAL_DEFAULT_RAW, "<=", f"p50 <= {GOAL_DEFAULT_RAW}x raw"),
]


def _pin_cpus() -> frozenset[int]:
    """The core both processes share when pinned: the last one this process may use."""
    return frozenset({max(os.sched_getaffinity(0))})


def _latency_reps(pair: Pair, nats_url: str, reps: int, count: int, warmup: int,
                  pinned: str) -> list[dict[str, dict]]:
    impls = _latency_impls(nats_url)
    names = [n for n in LATENCY_ORDER if n not in NEEDS_INLINE or inline_supported()]
    timeout = 60.0 + count * 0.01
    out: list[dict[str, dict]] = []
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        got: dict[str, dict] = {}
        for name in order:
            _label, server, client, server_kw, client_kw = impls[name]
            _, result = pair.run(
                server, client,
                server_kw={**server_kw, "timeout": timeout},
                client_kw={**client_kw, "count": count, "warmup": warmup, "timeout": timeout},
                timeout=timeout,
            )
            got[name] = result.get(str(LAT_SIZE), result)
        out.append(got)
        log(f"  references latency {pinned} rep {rep + 1}/{reps}: " + ", ".join(
            f"{n} {2 * got[n]['p50_us']:.0f}" for n in names) + " µs round trip p50")
    return out


def _require_python_refs() -> None:
    try:
        import nats  # noqa: F401
        import zenoh  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"{exc}: the references need the bench extra (eclipse-zenoh, "
                         "nats-py): run `make venv` or `bash bench/setup.sh`") from None


def latency(pair: Pair, cfg: pubsub.Config) -> list[dict]:
    """The side-by-side latency table, pinned then unpinned, and the goal rows."""
    _require_python_refs()
    rows: list[dict] = []
    cpus = _pin_cpus()
    for pinned in ("pinned", "unpinned"):
        pin = cpus if pinned == "pinned" else None
        with nats_server(pin) as url, contextlib.ExitStack() as stack:
            use = stack.enter_context(workers(pin)) if pin else pair
            reps = _latency_reps(use, url, cfg.ref_reps, cfg.lat_count, cfg.lat_warmup, pinned)
        rows.extend(_latency_rows(reps, url, pinned, sorted(cpus) if pin else None))
    return rows


def _latency_rows(reps: list[dict[str, dict]], url: str, pinned: str,
                  cpus: list[int] | None) -> list[dict]:
    impls = _latency_impls(url)
    rows: list[dict] = []
    med = pubsub._median
    for name in LATENCY_ORDER:
        label = impls[name][0]
        if name not in reps[0]:
            rows.append({"bench": "references", "kind": "latency", "impl": name, "label": label,
                         "pinned": pinned, "cpus": cpus, "supported": False})
            continue
        runs = [r[name] for r in reps]
        ratios = [r[name]["p50_us"] / r["raw"]["p50_us"] for r in reps]
        rows.append({
            "bench": "references", "kind": "latency", "impl": name, "label": label,
            "pinned": pinned, "cpus": cpus, "supported": True, "size": LAT_SIZE,
            "transport": "tcp",
            # Round trips, as the table; the latency rows elsewhere are one-way.
            "rtt_us": {q: 2 * med([x[f"{q}_us"] for x in runs]) for q in ("p50", "p90", "p99")},
            "ratio_vs_raw": med(ratios), "ratios_vs_raw": ratios, "reps": len(reps),
        })
    for impl, ref, goal, op, text in LATENCY_GOALS:
        if impl not in reps[0]:
            continue  # shown as "not supported yet" in the table and the goals list
        ratios = [r[impl]["p50_us"] / r[ref]["p50_us"] for r in reps]
        p99 = [r[impl]["p99_us"] / r[ref]["p99_us"] for r in reps]
        ratio = med(ratios)
        keys = ("p50_us", "p90_us", "p99_us", "mean_us")
        rows.append({
            "bench": "latency", "impl": impl, "transport": f"tcp, {pinned}",
            "case": f"one-way {LAT_SIZE} B (RTT/2), {impls[impl][0]}",
            "reference": impls[ref][0], "ref_impl": ref, "unit": "µs", "metric": "p50 one-way latency (RTT/2)",
            "mesh": {k: med([r[impl][k] for r in reps]) for k in keys},
            "raw": {k: med([r[ref][k] for r in reps]) for k in keys},
            "ratio": ratio, "ratios": ratios, "p99_ratio": med(p99),
            "goal": text,
            "met": ratio <= goal if op == "<=" else ratio < goal, "reps": len(reps),
        })
    return rows


# ====================================================================== Zenoh throughput


def zenoh_sink_task(ctl: Control, count: int, timeout: float, ends: int = 1) -> dict:
    """Counts samples in the subscriber callback; an empty sample per publisher
    marks its end (same key, so it comes after its data)."""
    sink = pubsub._Sink()
    pc = time.perf_counter
    ended = [0]
    lock = threading.Lock()  # callbacks of several publishers may run on several threads

    def on_sample(sample: Any) -> None:
        with lock:
            if not len(sample.payload):
                ended[0] += 1
                if ended[0] >= ends:
                    sink.done.set()
                return
            sink.n += 1
            sink.t_last = pc()

    session, endpoint = _zenoh_listen()
    with session:
        session.declare_subscriber(Z_DATA, on_sample)
        ctl.send("ready", endpoint)
        stalled = pubsub._wait_end(sink, timeout)
        if stalled:
            raise BenchError(f"zenoh sink: {sink.n} of {count} messages, {stalled}")
        return sink.result()


def zenoh_source_task(
    ctl: Control, endpoint: str, count: int, timeout: float, endpoints: list[str] | None = None,
    size: int = 64, sync: bool = False,
) -> dict:
    """Puts with CongestionControl.BLOCK (waits when Zenoh's queue is full: nothing
    is dropped), connected to every subscriber directly."""
    import zenoh

    targets = endpoints or [endpoint]
    payload = os.urandom(size)
    warm = pubsub._warm_count("bytes", count)
    with zenoh.open(_zenoh_config(connect=targets)) as session:
        _wait_zenoh_peers(session, len(targets))
        pub = session.declare_publisher(Z_DATA, congestion_control=zenoh.CongestionControl.BLOCK)
        deadline = time.monotonic() + pubsub.JOIN_TIMEOUT
        # MatchingStatus.matching, or a plain bool in some versions of the stubs.
        while not getattr(pub.matching_status, "matching", pub.matching_status):
            if time.monotonic() > deadline:
                raise BenchError("zenoh source: no matching subscriber")
            time.sleep(0.01)
        time.sleep(0.2)  # every subscriber's declaration, not just the first
        put = pub.put
        cpu0, threads0 = pubsub._cpu(), pubsub._thread_cpu()
        for _ in range(warm):
            put(payload)
        time.sleep(0.3)
        pubsub._start_together(ctl, sync)
        t0 = time.perf_counter()
        for _ in range(count):
            put(payload)
        seconds = time.perf_counter() - t0
        put(b"")
        ctl.wait_stop(timeout)
        return {"sent": count, "warm": warm, "t0": t0, "send_per_s": count / seconds,
                "cpu_s": pubsub._cpu() - cpu0,
                "thread_cpu_s": pubsub._delta(pubsub._thread_cpu(), threads0), "drops": 0}


# ====================================================================== throughput, parent side

SHAPES = {"1->1": (1, 1), "4->1": (4, 1), "1->4": (1, 4)}  # (publishers, subscribers)
TP_IMPLS = ("raw", "zenoh", "mesh")


def _shape_run(group: Crew, impl: str, shape: str, size: int, count: int) -> dict:
    """One run: sinks first (they bind), then sources told every sink's endpoint;
    all sources warm up, then start together on "go"."""
    n_src, n_sink = SHAPES[shape]
    timeout = 90.0 + count * n_src * n_sink * 0.002
    members = group.ensure()
    sinks, sources = members[:n_sink], members[n_sink:n_sink + n_src]
    if impl == "zenoh":
        sink_t, src_t = f"{HERE}:zenoh_sink_task", f"{HERE}:zenoh_source_task"
        sink_kw: dict[str, Any] = {}
        src_kw: dict[str, Any] = {}
    else:
        sink_t, src_t = f"{PS}:{impl}_sink_task", f"{PS}:{impl}_source_task"
        sink_kw = {"transport": "tcp", "kind": "bytes"}
        src_kw = {"transport": "tcp", "kind": "bytes"}
        if impl == "mesh":
            src_kw["pub_timeout"] = 5.0  # waits for credit or room: nothing dropped
    try:
        for worker in sinks:
            worker.run(sink_t, count=count * n_src, timeout=timeout, ends=n_src, **sink_kw)
        endpoints = [worker.expect("ready", 30.0) for worker in sinks]
        for worker in sources:
            worker.run(src_t, endpoint=endpoints[0], endpoints=endpoints, count=count,
                       timeout=timeout, size=size, sync=True, **src_kw)
        for worker in sources:
            worker.expect("warm", 60.0)
        for worker in sources:
            worker.tell("go")
        sink_results = [worker.expect("done", timeout) for worker in sinks]
        for worker in sources:
            worker.stop()
        source_results = [worker.expect("done", 30.0) for worker in sources]
    except BaseException:
        group.reset()
        raise
    warm = sum(s["warm"] for s in source_results)
    timed = sum(s["received"] for s in sink_results) - n_sink * warm
    seconds = max(s["t_last"] for s in sink_results) - min(s["t0"] for s in source_results)
    if timed <= 0 or seconds <= 0:
        raise BenchError(f"{impl} {shape}: nothing to time ({timed} messages)")
    expected = count * n_src * n_sink
    cpu = sum(s["cpu_s"] for s in sink_results + source_results)
    return {"rate": timed / seconds, "received": timed, "expected": expected,
            "cpu_us_per_msg": cpu * 1e6 / timed,
            "publisher_drops": sum(s.get("drops", 0) for s in source_results)}


def throughput(cfg: pubsub.Config) -> list[dict]:
    """64 B and 1 KiB, 1->1, 4->1, 1->4, raw / Zenoh / mesh, interleaved per rep."""
    _require_python_refs()
    rows: list[dict] = []
    count = cfg.ref_tp_count
    with crew(5) as group:
        for size in (64, 1024):
            for shape in SHAPES:
                reps: list[dict[str, dict]] = []
                for rep in range(cfg.ref_tp_reps):
                    order = TP_IMPLS if rep % 2 == 0 else TP_IMPLS[::-1]
                    got = {impl: _shape_run(group, impl, shape, size, count) for impl in order}
                    reps.append(got)
                    log(f"  references throughput {size} B {shape} rep {rep + 1}/"
                        f"{cfg.ref_tp_reps}: " + ", ".join(
                            f"{i} {got[i]['rate']:,.0f}/s" for i in TP_IMPLS))
                rows.append(_throughput_row(reps, size, shape, count))
    return rows


def _throughput_row(reps: list[dict[str, dict]], size: int, shape: str, count: int) -> dict:
    med = pubsub._median
    out: dict[str, Any] = {"bench": "references", "kind": "throughput", "size": size,
                           "shape": shape, "count_per_publisher": count, "reps": len(reps),
                           "transport": "tcp"}
    for impl in TP_IMPLS:
        out[impl] = {"msgs_per_s": med([r[impl]["rate"] for r in reps]),
                     "rates": [r[impl]["rate"] for r in reps],
                     "cpu_us_per_msg": med([r[impl]["cpu_us_per_msg"] for r in reps]),
                     "received": [r[impl]["received"] for r in reps],
                     "expected": reps[0][impl]["expected"],
                     "publisher_drops": [r[impl]["publisher_drops"] for r in reps]}
    out["mesh_vs_raw"] = med([r["mesh"]["rate"] / r["raw"]["rate"] for r in reps])
    out["mesh_vs_zenoh"] = med([r["mesh"]["rate"] / r["zenoh"]["rate"] for r in reps])
    return out


# ====================================================================== tables


def table(rows: list[dict]) -> str:
    """The side-by-side tables (latency, throughput) and the goals of #15."""
    lines: list[str] = []
    lat = [r for r in rows if r["bench"] == "references" and r["kind"] == "latency"]
    if lat:
        lines += ["", f"=== latency, {LAT_SIZE} B, tcp loopback: round trip (µs) and p50 ratio "
                  "to raw pyzmq (median of per-repetition ratios; same run) ==="]
        for pinned in ("pinned", "unpinned"):
            group = [r for r in lat if r["pinned"] == pinned]
            if not group:
                continue
            cpus = next((r["cpus"] for r in group if r.get("cpus")), None)
            lines.append(f"-- {pinned}" + (f" (both processes on CPU {cpus})" if cpus else ""))
            lines.append(f"{'':<48} {'p50':>8} {'p90':>8} {'p99':>8}  vs raw")
            for r in group:
                if not r["supported"]:
                    lines.append(f"{r['label']:<48} not supported yet (Node.subscribe has "
                                 "no inline=)")
                    continue
                rtt = r["rtt_us"]
                lines.append(f"{r['label']:<48} {rtt['p50']:8.1f} {rtt['p90']:8.1f} "
                             f"{rtt['p99']:8.1f}  {r['ratio_vs_raw']:5.2f}x")
        goals = [r for r in rows if r["bench"] == "latency" and "ref_impl" in r]
        lines.append("-- goals (issue #15), p50 ratio")
        for pinned in ("pinned", "unpinned"):
            for impl, ref, _goal, _op, text in LATENCY_GOALS:
                match = [r for r in goals if r["impl"] == impl and r["ref_impl"] == ref
                         and r["transport"] == f"tcp, {pinned}"]
                want = f"{impl}: {text}"
                if match:
                    r = match[0]
                    lines.append(f"{pinned:<9} {want:<34} {r['ratio']:5.2f}x  "
                                 f"{'met' if r['met'] else 'MISSED'}")
                else:
                    lines.append(f"{pinned:<9} {want:<34}     -   not supported yet")
    tp = [r for r in rows if r["bench"] == "references" and r["kind"] == "throughput"]
    if tp:
        lines += ["", "=== throughput, tcp loopback, msgs/s received (all subscribers), nothing "
                  "dropped (Zenoh BLOCK, mesh publish(timeout=5), raw PUSH) ==="]
        lines.append(f"{'size':>6} {'shape':<6} {'raw pyzmq':>12} {'Zenoh':>12} {'mesh':>12} "
                     f"{'mesh/raw':>9} {'mesh/Zenoh':>11}  CPU µs/msg raw/Zenoh/mesh")
        for r in tp:
            # Counted at the receivers: anything short of what was sent is reported.
            lost = {i: len(r[i]["received"]) * r[i]["expected"] - sum(r[i]["received"])
                    for i in TP_IMPLS}
            note = "; ".join(f"{i} lost {n:,}" for i, n in lost.items() if n)
            lines.append(
                f"{r['size']:>5}B {r['shape']:<6} {r['raw']['msgs_per_s']:>12,.0f} "
                f"{r['zenoh']['msgs_per_s']:>12,.0f} {r['mesh']['msgs_per_s']:>12,.0f} "
                f"{r['mesh_vs_raw']:>8.0%} {r['mesh_vs_zenoh']:>10.0%}  "
                f"{r['raw']['cpu_us_per_msg']:.1f} / {r['zenoh']['cpu_us_per_msg']:.1f} / "
                f"{r['mesh']['cpu_us_per_msg']:.1f}" + (f"  ({note})" if note else ""))
    return "\n".join(lines)
