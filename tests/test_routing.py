"""The routing table: local subscriptions plus peers' advertised interest (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidSubject
from mesh.routing import RoutingTable
from mesh.subjects import matches


@dataclass(eq=False)
class Sub:
    pattern: str
    queue: str = ""


def entry(pattern: str, queue: str = "", sid: int = 1, n_credits: int = 256, overflow: str = "block"):
    return (pattern, queue, sid, n_credits, 0, overflow)


def add(table: RoutingTable, pattern: str, queue: str = "", sid: int = 1) -> Sub:
    sub = Sub(pattern, queue)
    table.add_local(pattern, sub, entry(pattern, queue, sid))
    return sub


def test_local_plain_and_queue_groups() -> None:
    t = RoutingTable()
    plain = add(t, "grad.>", sid=1)
    w1 = add(t, "jobs.*", "workers", sid=2)
    w2 = add(t, "jobs.>", "workers", sid=3)
    other = add(t, "jobs.a", "auditors", sid=4)
    r = t.route("jobs.a")
    assert r.local == ()
    assert set(r.local_groups["workers"]) == {w1, w2}
    assert r.local_groups["auditors"] == (other,)
    assert t.route("grad.w1.l1").local == (plain,)
    assert t.route("nothing").empty


def test_local_interest_versions() -> None:
    t = RoutingTable()
    a, b = Sub("x.>"), Sub("x.>")
    v = t.local_version
    t.add_local("x.>", a, entry("x.>", sid=1))
    t.add_local("x.>", b, entry("x.>", sid=2))
    assert t.local_version == v + 2  # each subscription is its own entry
    assert t.remove_local("x.>", a, entry("x.>", sid=1)) == entry("x.>", sid=1)
    assert t.local_interest() == [entry("x.>", sid=2)]
    assert t.remove_local("x.>", a, entry("x.>", sid=1)) is None  # already gone


def test_peer_snapshot_deltas_and_params() -> None:
    t = RoutingTable()
    t.set_peer_interest("p1", 3, [entry("grad.>", sid=7, n_credits=16), entry("jobs.*", "w", sid=8)])
    assert t.route("grad.a").peers == {"p1": (7,)}
    assert t.params("p1", 7) == (16, 0, "block")
    assert t.route("jobs.x").peer_groups == {"w": (("p1", 8),)}
    bad = t.apply_peer_delta("p1", 4, [entry("params.*", sid=9), entry("bad..x", sid=10)],
                             [entry("grad.>", sid=7, n_credits=16)])
    assert bad == ["bad..x"]
    assert t.route("grad.a").empty  # the cached route was invalidated
    assert t.params("p1", 7) is None
    assert t.route("params.x").peers == {"p1": (9,)}
    assert t.apply_peer_delta("p1", 6, [entry("z")], []) is None  # skipped 5: resync needed
    assert t.route("z").empty
    assert t.set_peer_interest("p1", 2, [entry("old.>")]) == []  # stale snapshot ignored
    assert t.route("old.x").empty
    t.remove_peer("p1")
    assert t.route("params.x").empty and t.peer_interest("p1") == []


def test_two_subscriptions_of_one_peer_are_both_routed() -> None:
    t = RoutingTable()
    t.set_peer_interest("p", 0, [entry("a.*", sid=1), entry("a.>", sid=2), entry("b", sid=3)])
    assert t.route("a.x").peers == {"p": (1, 2)}
    assert t.route("a.x").nodes() == {"p"}


def test_invalid_remote_patterns_are_skipped_and_reported() -> None:
    t = RoutingTable()
    bad = t.set_peer_interest("p", 0, [entry("a..b", sid=1), entry("ok.*", sid=2), entry("x>", sid=3)])
    assert sorted(bad) == ["a..b", "x>"]
    assert t.route("ok.1").peers == {"p": (2,)}


def test_reserved_subjects_reach_only_reserved_patterns() -> None:
    t = RoutingTable()
    everything = add(t, ">", sid=1)
    internal = add(t, "_mesh.>", sid=2)
    t.set_peer_interest("p-all", 0, [entry(">", sid=1)])
    t.set_peer_interest("p-int", 0, [entry("_mesh.pressure.*", sid=1)])
    r = t.route("_mesh.pressure.n1")
    assert r.local == (internal,) and set(r.peers) == {"p-int"}
    r = t.route("user.x")
    assert r.local == (everything,) and set(r.peers) == {"p-all"}


def test_route_of_invalid_subject_raises() -> None:
    t = RoutingTable()
    with pytest.raises(InvalidSubject):
        t.route("a..b")


tokens = st.sampled_from(["a", "b", "c"])
patterns = st.lists(st.one_of(tokens, st.just("*")), min_size=1, max_size=3).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join(toks) + ".>"])
)
subjects = st.lists(tokens, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), patterns, st.sampled_from(["", "q"])), max_size=12),
    st.lists(subjects, min_size=1, max_size=8),
)
def test_route_equals_brute_force(entries: list, probes: list) -> None:
    t = RoutingTable()
    by_peer: dict[str, list] = {}
    for sid, (peer, pattern, queue) in enumerate(entries):
        by_peer.setdefault(peer, []).append((pattern, queue, sid))
    for peer, items in by_peer.items():
        t.set_peer_interest(peer, 0, [entry(p, q, sid) for p, q, sid in items])
    for subject in probes:
        r = t.route(subject)
        want_plain = {
            (peer, sid) for sid, (peer, pat, q) in enumerate(entries) if not q and matches(pat, subject)
        }
        want_group = {
            (peer, sid) for sid, (peer, pat, q) in enumerate(entries) if q and matches(pat, subject)
        }
        assert {(p, s) for p, sids in r.peers.items() for s in sids} == want_plain
        assert set(r.peer_groups.get("q", ())) == want_group
