"""Discovery: TXT encoding (pure, hypothesis), addresses, membership, and real mDNS.

The real-network tests run ZeroconfDiscovery in separate processes, either in a
LAN of network namespaces (tests/harness/netns_lab.sh, when root) or on the
loopback interface of this namespace; mDNS never uses any other interface.
Force a mode with ZMESH_TEST_NET=lab|lo. This file doubles as the child
program: ``python tests/test_discovery.py child ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from discovery import addresses as addr_mod  # noqa: E402
from discovery.addresses import (  # noqa: E402
    expand_tcp_endpoint,
    local_ipv4_addresses,
    parse_tcp_endpoint,
)
from discovery.base import Announcement, Discovery, same_cluster_peer  # noqa: E402
from discovery.zeroconf import (  # noqa: E402
    NAME_MAX,
    SERVICE_TYPE,
    TXT_ENTRY_MAX,
    ZeroconfDiscovery,
    announcement_from_properties,
    cosmetic_name,
    encode_properties,
    instance_name,
)
from mesh.errors import ClosedError, ConfigError  # noqa: E402


def _child_main(argv: list[str]) -> int:
    """child CLUSTER NODE_ID SERVICE_TYPE INTERFACES ENDPOINT; prints JSON events, 'close' on stdin ends it."""
    import logging

    cluster, node_id, stype, ifaces, endpoint = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    t0 = time.monotonic()
    lock = threading.Lock()

    def emit(**kw: Any) -> None:
        kw["t"] = round(time.monotonic() - t0, 3)
        with lock:
            print(json.dumps(kw), flush=True)

    me = Announcement(cluster, node_id, f"node {node_id}", 1, ("tcp",), (endpoint,), host="test")
    d = ZeroconfDiscovery(
        me,
        lambda a: emit(
            event="found", node_id=a.node_id, cluster=a.cluster, endpoints=list(a.endpoints)
        ),
        lambda n: emit(event="lost", node_id=n),
        interfaces=ifaces.split(",") if ifaces else None,
        service_type=stype,
    )
    ts = time.monotonic()
    d.start()
    emit(event="started", start_took=round(time.monotonic() - ts, 3))
    done = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "close":
                break
        done.set()  # "close", or the parent went away

    threading.Thread(target=read_stdin, daemon=True).start()
    done.wait(60)  # never outlive a broken test by much
    tc = time.monotonic()
    d.close()
    emit(event="closed", close_took=round(time.monotonic() - tc, 3))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    sys.exit(_child_main(sys.argv[2:]))

# The child program above needs none of the test tooling; importing it only
# here keeps a child's start-up (several per test, on a busy machine) short.
import ifaddr  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LAB_SH = ROOT / "tests" / "harness" / "netns_lab.sh"  # the project's namespace lab
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ann(**kw: Any) -> Announcement:
    base: dict[str, Any] = dict(
        cluster="exp-42",
        node_id="n1",
        name="worker-1",
        version=1,
        transports=("inproc", "ipc", "tcp"),
        endpoints=("tcp://10.77.0.1:40111", "ipc:///tmp/mesh-ab12.sock"),
        host="boot:netns",
    )
    base.update(kw)
    return Announcement(**base)


def txt_strings(props: dict[bytes, bytes]) -> list[bytes]:
    """The TXT strings exactly as python-zeroconf puts them on the wire."""
    from zeroconf import ServiceInfo

    info = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=props)
    text, out, pos = info.text, [], 0
    while pos < len(text):
        n = text[pos]
        out.append(text[pos + 1 : pos + 1 + n])
        assert len(out[-1]) == n, "TXT length byte overflowed"
        pos += 1 + n
    return out


# --------------------------------------------------------------------------- strategies

names = st.text(min_size=1, max_size=2000)
# what encode accepts: no control characters, <= FIELD_MAX (512) bytes even if all 4-byte
idents = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=128)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
tcp_eps = st.builds(
    lambda a, p: f"tcp://{a}:{p}", ipv4.filter(lambda a: a != "0.0.0.0"), st.integers(1, 65535)
)
ipc_eps = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_./", min_size=1, max_size=90).map(
    lambda s: f"ipc:///tmp/{s}"
)
endpoint_lists = st.lists(st.one_of(tcp_eps, ipc_eps), max_size=50, unique=True)
transports = st.lists(st.sampled_from(["inproc", "ipc", "tcp", "shm", "rdma"]), unique=True).map(
    tuple
)


# --------------------------------------------------------------------------- TXT encoding


@FAST
@given(name=names, eps=endpoint_lists, cluster=idents, node_id=idents, host=idents)
def test_every_txt_entry_fits(
    name: str, eps: list[str], cluster: str, node_id: str, host: str
) -> None:
    props = encode_properties(
        ann(name=name, endpoints=tuple(eps), cluster=cluster, node_id=node_id, host=host)
    )
    for key, value in props.items():
        assert len(key) + 1 + len(value) <= TXT_ENTRY_MAX < 255
    strings = txt_strings(props)
    assert strings and all(len(s) < 255 for s in strings)
    assert sum(1 + len(s) for s in strings) < 8000  # fits one mDNS packet


@FAST
@given(name=names, eps=endpoint_lists, cluster=idents, node_id=idents, host=idents, tr=transports)
def test_round_trip(
    name: str, eps: list[str], cluster: str, node_id: str, host: str, tr: tuple[str, ...]
) -> None:
    a = ann(
        name=name, endpoints=tuple(eps), cluster=cluster, node_id=node_id, host=host, transports=tr
    )
    # through the real TXT wire form, as a peer would parse it
    from zeroconf import ServiceInfo

    wire = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=encode_properties(a))
    parsed = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=wire.text).properties
    b = announcement_from_properties(parsed, ["10.0.0.9"])
    if not eps:
        assert b is None  # nothing to connect to
        return
    assert b is not None
    assert (b.cluster, b.node_id, b.host, b.version, b.transports) == (
        a.cluster,
        a.node_id,
        a.host,
        a.version,
        a.transports,
    )
    assert b.name == cosmetic_name(name) and len(b.name.encode()) <= NAME_MAX
    assert name.startswith(b.name) or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    # the endpoint budget may cut the tail, never the head, never reorder
    assert b.endpoints == a.endpoints[: len(b.endpoints)] and b.endpoints
    if sum(len(e) + 8 for e in eps) < 2500:
        assert b.endpoints == a.endpoints


@pytest.mark.parametrize("length", [1, 62, 63, 64, 95, 96, 97, 248, 254, 255, 256, 1000, 2000])
@pytest.mark.parametrize("n_eps", [0, 1, 7, 50])
@pytest.mark.parametrize("char", ["w", "é", "語", "😀"])
def test_txt_entry_limits_at_extremes(length: int, n_eps: int, char: str) -> None:
    eps = tuple(f"ipc:///tmp/{char * 20}-{i:03d}-{'p' * 60}.sock" for i in range(n_eps))
    a = ann(
        name=char * length, cluster=char * 100, node_id=char * 128, host=char * 128, endpoints=eps
    )
    props = encode_properties(a)
    assert all(len(k) + 1 + len(v) < 255 for k, v in props.items())
    assert all(len(s) < 255 for s in txt_strings(props))
    b = announcement_from_properties(props)
    if n_eps == 0:
        assert b is None
    else:
        assert b is not None and b.node_id == a.node_id and b.cluster == a.cluster
        assert b.endpoints == eps[: len(b.endpoints)] and len(b.endpoints) >= min(n_eps, 7)


def test_long_name_truncated_on_char_boundary() -> None:
    a = ann(name="ü" * 2000)
    props = encode_properties(a)
    assert len(props[b"name"]) <= NAME_MAX
    b = announcement_from_properties(props)
    assert b is not None and b.name == "ü" * (NAME_MAX // 2)


def test_long_identity_split_and_exact() -> None:
    a = ann(cluster="c" * 500, node_id="i" * 400, host="h" * 512)
    props = encode_properties(a)
    assert b"cluster.1" in props and b"cluster.2" in props
    assert announcement_from_properties(props) == a


def test_unannounceable_identity_refused() -> None:
    for bad in (
        dict(cluster=""),
        dict(node_id=""),
        dict(cluster="x" * 600),
        dict(node_id="a\nb"),
        dict(version=-1),
        dict(version=True),
        dict(transports=("tcp,ipc",)),
    ):
        with pytest.raises(ConfigError):
            encode_properties(ann(**bad))


def test_wildcard_endpoint_expanded_with_addresses() -> None:
    props = encode_properties(ann(endpoints=("tcp://0.0.0.0:7000", "ipc:///tmp/x.sock")))
    b = announcement_from_properties(props, ["10.77.0.2", "0.0.0.0", "garbage", "10.77.0.2"])
    assert b is not None
    assert b.endpoints == ("tcp://10.77.0.2:7000", "ipc:///tmp/x.sock")
    # without A records only the ipc endpoint is left
    b2 = announcement_from_properties(props, [])
    assert b2 is not None and b2.endpoints == ("ipc:///tmp/x.sock",)


GOOD = encode_properties(ann())


@pytest.mark.parametrize(
    "props",
    [
        {},
        {b"cluster": b"exp-42"},
        {**GOOD, b"ver": b"one"},
        {**GOOD, b"ver": b"-1"},
        {**GOOD, b"ver": b"9" * 50},
        {**GOOD, b"ver": None},
        {**GOOD, b"id": None},
        {**GOOD, b"id": b""},
        {**GOOD, b"cluster": b"\xff\xfe"},
        {**GOOD, b"cluster": b"a\x00b"},
        {**GOOD, b"ep0": b"not an endpoint", b"ep1": b"tcp://x"},
        {k: v for k, v in GOOD.items() if not k.startswith(b"ep")},
    ],
)
def test_garbage_txt_is_none(props: dict[bytes, bytes | None]) -> None:
    assert announcement_from_properties(props, ["10.0.0.1"]) is None


def test_garbage_types_are_none() -> None:
    for junk in (None, 42, "str", [b"a"], {1: 2}, {b"cluster": 5}):
        assert announcement_from_properties(junk, ["1.2.3.4"]) is None  # type: ignore[arg-type]
    assert announcement_from_properties(GOOD, None) is None  # type: ignore[arg-type]


def test_hostile_endpoints_are_dropped_not_fatal() -> None:
    props = {**GOOD, b"ep0": b"\xff", b"ep1": b"tcp://0.0.0.0:0", b"ep2": b"ipc:///ok"}
    props.pop(b"ep3", None)
    b = announcement_from_properties(props, ["10.0.0.1"])
    assert b is not None and b.endpoints == ("ipc:///ok",)


@FAST
@given(
    st.dictionaries(st.binary(max_size=20), st.none() | st.binary(max_size=300), max_size=40),
    st.lists(st.one_of(st.text(max_size=20), ipv4, st.binary(max_size=8), st.none()), max_size=5),
)
def test_random_txt_never_raises(props: dict[bytes, bytes | None], addrs: list[Any]) -> None:
    r = announcement_from_properties(props, addrs)
    assert r is None or isinstance(r, Announcement)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(list(GOOD) + [b"ep1.1", b"cluster.1", b"ep7", b"name"]),
        st.none() | st.binary(max_size=300),
        max_size=10,
    )
)
def test_corrupted_good_txt_never_raises(patch: dict[bytes, bytes | None]) -> None:
    r = announcement_from_properties({**GOOD, **patch}, ["10.0.0.1"])
    assert r is None or isinstance(r, Announcement)
    if r is not None:
        assert (
            r.cluster and r.node_id and r.endpoints and all(isinstance(e, str) for e in r.endpoints)
        )


@FAST
@given(name=names, node_id=st.text(min_size=1, max_size=500))
def test_instance_name_is_a_safe_label(name: str, node_id: str) -> None:
    label = instance_name(name, node_id)
    assert 0 < len(label.encode()) <= 56 and label.isascii()
    assert all(c.isalnum() or c in "-_" for c in label)
    from zeroconf import service_type_name

    service_type_name(f"{label}-99.{SERVICE_TYPE}")  # still valid after a rename


def test_a_trailing_newline_is_not_valid_anywhere() -> None:
    """``$`` also matches before a final newline: each check must refuse it."""
    assert "\n" not in instance_name("0", "0\n")  # the id is digested, not used as is
    assert announcement_from_properties({**GOOD, b"ver": b"1\n"}, ["10.0.0.1"]) is None
    b = announcement_from_properties({**GOOD, b"ep0": b"ipc:///x\n", b"ep1": b"ipc:///ok"}, ["10.0.0.1"])
    assert b is not None and b.endpoints == ("ipc:///ok",)
    with pytest.raises(ConfigError, match="transport"):
        encode_properties(ann(transports=("tcp\n",)))
    assert parse_tcp_endpoint("tcp://10.0.0.1:5555\n") is None


def test_instance_name_unique_per_node_id() -> None:
    ids = ["a" * 40 + str(i) for i in range(200)] + [f"id{i}" for i in range(200)]
    assert len({instance_name("same-name" * 20, i) for i in ids}) == len(ids)


# --------------------------------------------------------------------------- membership (no network)


def test_same_cluster_peer() -> None:
    me = ann()
    assert same_cluster_peer(me, ann(node_id="n2"))
    assert same_cluster_peer(me, ann(node_id="n2", version=99))  # the node decides on versions
    assert not same_cluster_peer(me, ann())  # myself
    assert not same_cluster_peer(me, ann(node_id="n2", cluster="other"))


class Recorder:
    def __init__(self) -> None:
        self.found: list[Announcement] = []
        self.lost: list[str] = []


def offline_discovery(rec: Recorder, **kw: Any) -> ZeroconfDiscovery:
    return ZeroconfDiscovery(ann(**kw), rec.found.append, rec.lost.append, interfaces=["lo"])


def fake_info(name: str, a: Announcement, addrs: list[str]) -> Any:
    from zeroconf import ServiceInfo

    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=1,
        properties=encode_properties(a),
        parsed_addresses=addrs,
    )


def test_membership_filters_and_dedups() -> None:
    rec = Recorder()
    d = offline_discovery(rec)
    for n, a in [
        ("self", ann()),
        ("other-cluster", ann(node_id="x", cluster="exp-43")),
        ("peer", ann(node_id="n2", version=7)),
        ("peer", ann(node_id="n2", version=7)),  # unchanged: reported once
    ]:
        d._handle(("changed", f"{n}.{SERVICE_TYPE}"))
        d._handle(("resolved", f"{n}.{SERVICE_TYPE}", fake_info(n, a, ["10.0.0.2"]), 0))
    assert [f.node_id for f in rec.found] == ["n2"] and rec.found[0].version == 7
    # an update is reported again
    d._handle(
        ("resolved", f"peer.{SERVICE_TYPE}", fake_info("peer", ann(node_id="n2", version=8), []), 0)
    )
    assert [f.version for f in rec.found] == [7, 8]
    d._handle(("removed", f"other-cluster.{SERVICE_TYPE}"))
    d._handle(("removed", f"self.{SERVICE_TYPE}"))
    assert rec.lost == []
    d._handle(("removed", f"peer.{SERVICE_TYPE}"))
    assert rec.lost == ["n2"]
    d._handle(("removed", f"peer.{SERVICE_TYPE}"))
    assert rec.lost == ["n2"]


def test_membership_node_under_two_names_and_late_results() -> None:
    rec = Recorder()
    d = offline_discovery(rec)
    p = ann(node_id="n2")
    for n in ("old", "new"):
        d._handle(("changed", f"{n}.{SERVICE_TYPE}"))
        d._handle(("resolved", f"{n}.{SERVICE_TYPE}", fake_info(n, p, ["10.0.0.2"]), 0))
    d._handle(("removed", f"old.{SERVICE_TYPE}"))
    assert rec.lost == []  # still announced as "new"
    d._handle(("removed", f"new.{SERVICE_TYPE}"))
    assert rec.lost == ["n2"]
    # a resolution that lands after the goodbye must not resurrect the node
    d._handle(("resolved", f"new.{SERVICE_TYPE}", fake_info("new", p, ["10.0.0.2"]), 0))
    assert len(rec.found) == 1
    # a failed resolution asks for a retry, a bounded number of times
    d._handle(("changed", f"slow.{SERVICE_TYPE}"))
    assert d._handle(("resolved", f"slow.{SERVICE_TYPE}", None, 0)) == (f"slow.{SERVICE_TYPE}", 0)
    assert d._handle(("resolved", f"slow.{SERVICE_TYPE}", None, 9)) is None


def test_callback_exceptions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_: Any) -> None:
        raise RuntimeError("callback bug")

    d = Discovery(ann(), boom, boom)
    d._emit_found(ann(node_id="n2"))
    d._emit_lost("n2")
    failed = [r for r in caplog.records if r.exc_info and "callback bug" in str(r.exc_info[1])]
    assert len(failed) == 2


def test_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="service type"):
        ZeroconfDiscovery(ann(), print, print, interfaces=["lo"], service_type="zmesh.local.")
    with pytest.raises(ConfigError, match="available"):
        ZeroconfDiscovery(ann(), print, print, interfaces=["no-such-if0"])
    d = ZeroconfDiscovery(ann(), print, print, interfaces=["127.0.0.1"])
    assert d.addresses == ["127.0.0.1"] and d.port == 40111
    d.close()
    d.close()  # idempotent, never started
    with pytest.raises(ClosedError):
        d.start()


# --------------------------------------------------------------------------- addresses (fake ifaddr)


def adapters(*spec: tuple[str, int, list[str]]) -> list[ifaddr.Adapter]:
    return [
        ifaddr.Adapter(
            n, n, [ifaddr.IP(ip, 24, n) for ip in ips] + [ifaddr.IP(("fe80::1", 0, i), 64, n)], i
        )
        for n, i, ips in spec
    ]


@pytest.fixture
def fake_net(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def install(*spec: tuple[str, int, list[str]]) -> None:
        monkeypatch.setattr(addr_mod.ifaddr, "get_adapters", lambda: adapters(*spec))

    return install


LAN = (
    ("lo", 1, ["127.0.0.1"]),
    ("eth0", 2, ["10.77.0.1", "0.0.0.0"]),
    ("eth1", 3, ["192.168.1.5"]),
)


def test_local_addresses(fake_net: Callable[..., None]) -> None:
    fake_net(*LAN)
    assert local_ipv4_addresses() == [("eth0", "10.77.0.1"), ("eth1", "192.168.1.5")]
    assert local_ipv4_addresses(include_loopback=True)[0] == ("lo", "127.0.0.1")
    assert local_ipv4_addresses(["eth1", "10.77.0.1"]) == [
        ("eth1", "192.168.1.5"),
        ("eth0", "10.77.0.1"),
    ]
    assert local_ipv4_addresses(["lo"]) == [("lo", "127.0.0.1")]  # named explicitly
    assert local_ipv4_addresses(["eth0", "10.77.0.1"]) == [("eth0", "10.77.0.1")]
    fake_net(*reversed(LAN))  # enumeration order does not leak through
    assert local_ipv4_addresses() == [("eth0", "10.77.0.1"), ("eth1", "192.168.1.5")]
    with pytest.raises(ConfigError, match=r"eth0 \(10\.77\.0\.1\)"):
        local_ipv4_addresses(["wlan0"])
    with pytest.raises(ConfigError):
        local_ipv4_addresses("eth0")  # type: ignore[arg-type]


def test_local_addresses_never_unspecified(fake_net: Callable[..., None]) -> None:
    fake_net(("eth0", 2, ["0.0.0.0"]), ("ifb0", 3, []))
    assert local_ipv4_addresses(include_loopback=True) == []
    with pytest.raises(ConfigError, match="no IPv4"):
        local_ipv4_addresses(["ifb0"])


def test_expand_tcp_endpoint(fake_net: Callable[..., None]) -> None:
    fake_net(*LAN)
    assert expand_tcp_endpoint("tcp://0.0.0.0:5555") == [
        "tcp://10.77.0.1:5555",
        "tcp://192.168.1.5:5555",
    ]
    assert expand_tcp_endpoint("tcp://*:5555", ["eth1"]) == ["tcp://192.168.1.5:5555"]
    assert expand_tcp_endpoint("tcp://0.0.0.0:5555", ["lo", "eth0"]) == [
        "tcp://10.77.0.1:5555",
        "tcp://127.0.0.1:5555",
    ]
    assert expand_tcp_endpoint("tcp://0.0.0.0:1", include_loopback=True)[-1] == "tcp://127.0.0.1:1"
    assert expand_tcp_endpoint("tcp://10.77.0.1:5555") == ["tcp://10.77.0.1:5555"]
    assert expand_tcp_endpoint("ipc:///tmp/a.sock") == ["ipc:///tmp/a.sock"]
    with pytest.raises(ConfigError, match="port 0"):
        expand_tcp_endpoint("tcp://0.0.0.0:0")
    with pytest.raises(ConfigError, match="malformed"):
        expand_tcp_endpoint("tcp://0.0.0.0")
    with pytest.raises(ConfigError):
        expand_tcp_endpoint("tcp://0.0.0.0:1", ["nope0"])
    fake_net(("lo", 1, ["127.0.0.1"]))  # nothing else: loopback it is
    assert expand_tcp_endpoint("tcp://0.0.0.0:5555") == ["tcp://127.0.0.1:5555"]


# --------------------------------------------------------------------------- real mDNS


def _loopback_multicast_works() -> bool:
    """Can a multicast datagram sent on lo be received on lo (kernel and lo flags permitting)?"""
    group = "224.0.0.251"
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 1))
        tx.sendto(b"probe", (group, port))
        return rx.recv(16) == b"probe"
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


def _netns_usable() -> str | None:
    """None when the namespace lab can run here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not LAB_SH.exists():
        return f"{LAB_SH} missing"
    if shutil.which("ip") is None:
        return "no `ip` command"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    return None if r.returncode == 0 else f"`ip netns` failed: {r.stderr.decode().strip()}"


class Lan:
    """Where child nodes run: host i of a namespace lab, or this namespace's loopback."""

    def __init__(self, mode: str, prefix: str = "") -> None:
        self.mode = mode
        self.prefix = prefix
        self.hosts = 3 if mode == "lab" else 1

    def wrap(self, host: int) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}h{host}"] if self.mode == "lab" else []

    def interfaces(self) -> str:
        return "" if self.mode == "lab" else "lo"  # lab: the default (all non-loopback = eth0)

    def address(self, host: int) -> str:
        return f"10.77.0.{host}" if self.mode == "lab" else "127.0.0.1"

    def lab(self, *args: str) -> None:
        env = {**os.environ, "ZMESH_LAB": self.prefix}
        subprocess.run(
            ["bash", str(LAB_SH), *args], env=env, check=True, timeout=60, capture_output=True
        )


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    forced = os.environ.get("ZMESH_TEST_NET", "")
    if forced not in ("", "lab", "lo"):
        pytest.fail(f"ZMESH_TEST_NET={forced!r}: use 'lab' or 'lo'")
    why_not_lab = _netns_usable()
    mode = forced or ("lab" if why_not_lab is None else "lo")
    if mode == "lab":
        if why_not_lab is not None:
            pytest.skip(f"namespace lab unavailable: {why_not_lab}")
        net = Lan("lab", prefix=f"zd{os.getpid() % 100000}-")
        try:
            net.lab("setup", str(net.hosts))
            yield net
        finally:
            net.lab("teardown")
    else:
        if not _loopback_multicast_works():
            pytest.skip(
                "multicast on loopback does not work here (as root: `ip link set lo multicast on`, "
                "or run as root so the namespace lab is used); mDNS must not use other interfaces"
            )
        yield Lan("lo")


class Child:
    """A ZeroconfDiscovery in its own process; its events arrive as JSON lines."""

    def __init__(
        self, net: Lan, host: int, *, cluster: str, node_id: str, stype: str, port: int
    ) -> None:
        self.node_id = node_id
        self.port = port
        self.host = host
        cmd = [
            *net.wrap(host),
            sys.executable,
            str(Path(__file__).resolve()),
            "child",
            cluster,
            node_id,
            stype,
            net.interfaces(),
            f"tcp://0.0.0.0:{port}",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                ev["at"] = time.monotonic()
                self.events.put(ev)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        for ev in self.seen:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(ev)
            if pred(ev):
                return ev
        return None

    def drain(self) -> list[dict[str, Any]]:
        self.wait(lambda _: False, 0)
        with contextlib.suppress(queue.Empty):
            while True:
                self.seen.append(self.events.get_nowait())
        return self.seen

    def found(self, node_id: str, timeout: float) -> dict[str, Any] | None:
        return self.wait(lambda e: e["event"] == "found" and e["node_id"] == node_id, timeout)

    def lost(self, node_id: str, timeout: float) -> dict[str, Any] | None:
        return self.wait(lambda e: e["event"] == "lost" and e["node_id"] == node_id, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("close\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        self.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __repr__(self) -> str:
        return f"<{self.node_id} events={self.drain()} stderr={''.join(self.stderr)[-2000:]}>"


@pytest.fixture
def spawn(lan: Lan) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []
    stype = f"_zt{secrets.token_hex(4)}._tcp.local."  # private to this test: no cross talk on lo

    def make(host: int, cluster: str, node_id: str) -> Child:
        c = Child(
            lan, host, cluster=cluster, node_id=node_id, stype=stype, port=41000 + len(children)
        )
        children.append(c)
        return c

    try:
        yield make
    finally:
        for c in children:
            c.close()  # all at once: each close sends goodbyes for ~0.25 s
        for c in children:
            c.stop()


def _started(e: dict[str, Any]) -> bool:
    return e["event"] == "started"


@pytest.mark.timeout(90)
def test_real_mdns_find_filter_and_goodbye(lan: Lan, spawn: Callable[..., Child]) -> None:
    def h(i: int) -> int:
        return min(i, lan.hosts)  # lo mode: everything on the one host

    a1 = spawn(h(1), "A", "a1")
    a2 = spawn(h(2), "A", "a2")
    a3 = spawn(h(1), "A", "a3")  # same host as a1: several workers per machine
    b1 = spawn(h(3), "B", "b1")
    group = [a1, a2, a3]
    for c in [*group, b1]:
        assert c.wait(_started, 15), c
    found_at: dict[tuple[str, str], float] = {}
    for c in group:
        for other in group:
            if other is not c:
                ev = c.found(other.node_id, 10)
                assert ev is not None, (c, other.node_id)
                both_up = max(c.wait(_started, 0)["at"], other.wait(_started, 0)["at"])  # type: ignore[index]
                found_at[(c.node_id, other.node_id)] = round(max(0.0, ev["at"] - both_up), 3)
                # the wildcard endpoint arrives expanded with the peer's real address
                assert f"tcp://{lan.address(other.host)}:{other.port}" in ev["endpoints"], ev
                assert ev["cluster"] == "A"
    starts = {c.node_id: c.wait(_started, 0)["start_took"] for c in group}  # type: ignore[index]
    print(f"\n[{lan.mode}] start() took {starts}; found after both were up (s): {found_at}")

    # a late joiner on an already busy host finds everyone through queries
    a4 = spawn(h(1), "A", "a4")
    assert a4.wait(_started, 15), a4
    late = {}
    for other in group:
        ev = a4.found(other.node_id, 10)
        assert ev is not None, (a4, other.node_id)
        late[other.node_id] = round(ev["at"] - a4.wait(_started, 0)["at"], 3)  # type: ignore[index]
        assert other.found("a4", 10) is not None, (other, "a4")
    print(f"[{lan.mode}] late joiner a4 found the others after (s): {late}")
    group.append(a4)

    time.sleep(0.5)  # give cross-cluster leaks a chance to show
    assert not [e for e in b1.drain() if e["event"] in ("found", "lost")], b1
    for c in group:
        assert not any(e["event"] == "found" and e["node_id"] == "b1" for e in c.drain()), c
        assert not any(e["event"] == "found" and e["node_id"] == c.node_id for e in c.drain()), c

    # a2 closes: everybody else hears its goodbye quickly
    t_close = time.monotonic()
    a2.close()
    closed = a2.wait(lambda e: e["event"] == "closed", 10)
    assert closed is not None and closed["close_took"] < 3.5, a2
    lost_after = {}
    for c in (a1, a3, a4):
        ev = c.lost("a2", 8)
        assert ev is not None, c
        lost_after[c.node_id] = round(ev["at"] - t_close, 3)
    print(f"[{lan.mode}] a2 close took {closed['close_took']:.3f} s; on_lost after", lost_after)
    assert a2.proc.wait(5) == 0
    for c in (a1, a3, a4):
        assert not any(e["event"] == "lost" and e["node_id"] != "a2" for e in c.drain()), c


@pytest.mark.timeout(90)
def test_lifecycle_in_process_on_loopback() -> None:
    if not _loopback_multicast_works():
        pytest.skip("multicast on loopback does not work here; mDNS must not use other interfaces")
    rec = Recorder()
    stype = f"_zt{secrets.token_hex(4)}._tcp.local."
    d = ZeroconfDiscovery(
        ann(endpoints=("tcp://127.0.0.1:40999",)),
        rec.found.append,
        rec.lost.append,
        interfaces=["lo"],
        service_type=stype,
    )
    t = time.monotonic()
    d.start()
    d.start()  # idempotent
    started = time.monotonic() - t
    assert started < 2.0, f"start took {started:.2f} s"
    t = time.monotonic()
    d.close()
    d.close()
    closed = time.monotonic() - t
    assert closed < 3.5, f"close took {closed:.2f} s"
    assert rec.found == [] and rec.lost == []  # never reports itself
    with pytest.raises(ClosedError):
        d.start()
    leftover = [th.name for th in threading.enumerate() if "zmesh-discovery" in th.name]
    assert leftover == []
