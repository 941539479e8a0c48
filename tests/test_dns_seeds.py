"""DNS seeds (discovery/dns.py): the diff and schedule with an injected resolver and
clock, then real nodes on 127.0.0.1 and 127.0.0.2 found through one name."""

from __future__ import annotations

import socket
import threading

import pytest
from meshproc import wait_until

import mesh
from discovery import dns
from discovery.dns import DnsSeeds, diff, parse_dns_seed


class FakeResolver:
    """name -> addresses; an entry that is an exception is raised (a failed lookup)."""

    def __init__(self, table: dict) -> None:
        self.table = dict(table)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def set(self, name: str, value) -> None:
        with self.lock:
            self.table[name] = value

    def __call__(self, name: str) -> list[str]:
        with self.lock:
            self.calls.append(name)
            value = self.table.get(name, socket.gaierror(socket.EAI_NONAME, "unknown"))
        if isinstance(value, BaseException):
            raise value
        return list(value)


def _seeds(table: dict, *names: str, **kw):
    changes: list[tuple[list[str], list[str]]] = []
    resolver = FakeResolver(table)
    seeds = DnsSeeds([f"dns://{n}:7777" for n in names], lambda a, r: changes.append((a, r)),
                     resolver=resolver, interval=5.0, retry=0.5, **kw)
    return seeds, resolver, changes


def test_diff_is_added_and_removed_sorted():
    assert diff({"b", "a"}, {"c", "a", "d"}) == (["c", "d"], ["b"])
    assert diff([], []) == ([], [])


@pytest.mark.parametrize("seed", ["dns://name", "dns://name:0", "dns://name:70000", "dns://:80",
                                  "dns://na me:80", "tcp://x:1"])
def test_parse_dns_seed_refuses_malformed(seed):
    with pytest.raises(mesh.ConfigError, match="dns://NAME:PORT"):
        parse_dns_seed(seed)


def test_node_refuses_a_malformed_dns_seed_at_construction():
    with pytest.raises(mesh.ConfigError, match="dns://NAME:PORT"):
        mesh.Node(seeds=("dns://trainers",), discovery="none")


def test_first_resolution_reports_every_address_then_waits_the_interval():
    seeds, resolver, changes = _seeds({"svc": ["10.0.0.2", "10.0.0.1"]}, "svc")
    assert seeds.tick(100.0) == 105.0
    assert changes == [(["tcp://10.0.0.1:7777", "tcp://10.0.0.2:7777"], [])]
    assert seeds.tick(104.9) == 105.0 and resolver.calls == ["svc"]  # not due: no lookup


def test_reresolution_reports_new_and_gone_addresses():
    seeds, resolver, changes = _seeds({"svc": ["10.0.0.1", "10.0.0.2"]}, "svc")
    seeds.tick(0.0)
    resolver.set("svc", ["10.0.0.2", "10.0.0.3"])  # a pod replaced
    seeds.tick(5.0)
    assert changes[-1] == (["tcp://10.0.0.3:7777"], ["tcp://10.0.0.1:7777"])
    seeds.tick(10.0)  # same answer: nothing to report
    assert len(changes) == 2


def test_failed_lookup_keeps_known_addresses_and_retries_sooner():
    seeds, resolver, changes = _seeds({"svc": ["10.0.0.1"]}, "svc")
    seeds.tick(0.0)
    resolver.set("svc", socket.gaierror(socket.EAI_AGAIN, "temporary failure"))
    assert seeds.tick(5.0) == 5.5  # retry, not interval
    assert seeds.endpoints() == ["tcp://10.0.0.1:7777"] and len(changes) == 1
    assert seeds.failures == 1


def test_unresolved_name_is_retried_quickly_until_it_resolves():
    seeds, resolver, changes = _seeds({}, "svc")
    assert seeds.tick(0.0) == 0.5 and changes == []
    resolver.set("svc", [])  # resolves, but no ready pod yet
    assert seeds.tick(0.5) == 1.0
    resolver.set("svc", ["10.0.0.1"])
    assert seeds.tick(1.0) == 6.0
    assert changes == [(["tcp://10.0.0.1:7777"], [])]


def test_several_names_and_ipv6_answers_skipped():
    seeds, _, changes = _seeds({"a": ["10.0.0.1"], "b": ["10.0.0.1", "::1", "10.0.0.9"]},
                               "a", "b")
    seeds.tick(0.0)
    assert changes == [(["tcp://10.0.0.1:7777", "tcp://10.0.0.9:7777"], [])]


def test_callback_errors_are_logged_not_raised(caplog):
    seeds = DnsSeeds(["dns://svc:1"], lambda a, r: 1 / 0, resolver=lambda n: ["10.0.0.1"])
    seeds.tick(0.0)
    assert "DNS seed callback failed" in caplog.text


def test_resolve_ipv4_localhost_and_unknown():
    assert "127.0.0.1" in dns.resolve_ipv4("localhost")
    with pytest.raises(OSError):
        dns.resolve_ipv4("no-such-host.invalid")


def test_thread_resolves_on_its_own_and_close_stops_it():
    found = threading.Event()
    seeds = DnsSeeds(["dns://svc:1"], lambda a, r: found.set(), resolver=lambda n: ["10.0.0.1"],
                     interval=0.05, owner="t")
    seeds.start()
    try:
        assert found.wait(5.0)
    finally:
        seeds.close()
    assert not seeds._thread.is_alive()


def _port_free_on(addrs: list[str]) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addrs[0], 0))
            port = s.getsockname()[1]
        try:
            for addr in addrs[1:]:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every address")


def test_real_nodes_found_through_one_name_and_resolved_again(procs, make_node, monkeypatch):
    """Two nodes in their own processes, on 127.0.0.1 and 127.0.0.2 with one port, that
    know nothing of each other: the name first resolves to one, later to both, then to
    the second only. The seeded node joins each as the name starts to list it."""
    port = _port_free_on(["127.0.0.1", "127.0.0.2"])
    a, b = procs.start_many({
        "dns-a": {"listen": (f"tcp://127.0.0.1:{port}",)},
        "dns-b": {"listen": (f"tcp://127.0.0.2:{port}",)},
    })
    resolver = FakeResolver({"trainers.test": ["127.0.0.1"]})
    monkeypatch.setattr(dns, "resolve_ipv4", resolver)
    monkeypatch.setattr(dns, "DEFAULT_INTERVAL", 0.2)
    node = make_node("dns-seeded", seeds=(f"dns://trainers.test:{port}",), discovery="static")

    def names() -> set[str]:
        return {p.name for p in node.peers() if p.state == "alive"}

    assert wait_until(lambda: names() == {"dns-a"}, 10.0), names()
    resolver.set("trainers.test", ["127.0.0.2", "127.0.0.1"])
    assert wait_until(lambda: names() == {"dns-a", "dns-b"}, 10.0), names()
    resolver.set("trainers.test", ["127.0.0.2"])
    gone = f"tcp://127.0.0.1:{port}"
    assert wait_until(lambda: gone not in node._seed_socks, 10.0)
    assert f"tcp://127.0.0.2:{port}" in node._seed_socks
    assert names() == {"dns-a", "dns-b"}  # a seed going away is not a peer going away
    assert node.seeds == (f"dns://trainers.test:{port}",)
    assert a.id != b.id
