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


def add(table: RoutingTable, pattern: str, queue: str = "") -> Sub:
    sub = Sub(pattern, queue)
    table.add_local(pattern, sub, queue)
    return sub


def test_local_plain_and_queue_groups() -> None:
    t = RoutingTable()
    plain = add(t, "grad.>")
    w1 = add(t, "jobs.*", "workers")
    w2 = add(t, "jobs.>", "workers")
    other = add(t, "jobs.a", "auditors")
    r = t.route("jobs.a")
    assert r.local == ()
    assert set(r.local_groups["workers"]) == {w1, w2}
    assert r.local_groups["auditors"] == (other,)
    assert t.route("grad.w1.l1").local == (plain,)
    assert t.route("nothing").empty


def test_local_interest_refcounts_and_versions() -> None:
    t = RoutingTable()
    a, b = Sub("x.>"), Sub("x.>")
    assert t.add_local("x.>", a) == ("x.>", "")
    v = t.local_version
    assert t.add_local("x.>", b) is None  # same interest: nothing new to advertise
    assert t.local_version == v
    assert t.remove_local("x.>", a) is None  # b still wants it
    assert t.remove_local("x.>", b) == ("x.>", "")
    assert t.local_version == v + 1
    assert t.remove_local("x.>", b) is None  # unknown pair: no change


def test_peer_snapshot_and_deltas() -> None:
    t = RoutingTable()
    t.set_peer_interest("p1", 3, [("grad.>", ""), ("jobs.*", "w")])
    r = t.route("grad.a")
    assert r.peers == ("p1",)
    assert t.route("jobs.x").peer_groups == {"w": ("p1",)}
    assert t.apply_peer_delta("p1", 4, [("params.*", ""), ("bad..x", "")], [("grad.>", "")]) == [
        "bad..x"
    ]
    assert t.route("grad.a").empty  # the cached route was invalidated
    assert t.route("params.x").peers == ("p1",)
    assert t.apply_peer_delta("p1", 6, [("z", "")], []) is None  # skipped version 5: resync needed
    assert t.route("z").empty
    assert t.set_peer_interest("p1", 2, [("old.>", "")]) == []  # stale snapshot ignored
    assert t.route("old.x").empty
    t.remove_peer("p1")
    assert t.route("params.x").empty and t.peer_interest("p1") == []


def test_invalid_remote_patterns_are_skipped_and_reported() -> None:
    t = RoutingTable()
    bad = t.set_peer_interest("p", 0, [("a..b", ""), ("ok.*", ""), ("x>", "")])
    assert sorted(bad) == ["a..b", "x>"]
    assert t.route("ok.1").peers == ("p",)


def test_reserved_subjects_reach_only_reserved_patterns() -> None:
    t = RoutingTable()
    everything = add(t, ">")
    internal = add(t, "_mesh.>")
    t.set_peer_interest("p-all", 0, [(">", "")])
    t.set_peer_interest("p-int", 0, [("_mesh.pressure.*", "")])
    r = t.route("_mesh.pressure.n1")
    assert r.local == (internal,) and r.peers == ("p-int",)
    r = t.route("user.x")
    assert r.local == (everything,) and r.peers == ("p-all",)


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
    for peer, pattern, queue in entries:
        by_peer.setdefault(peer, []).append((pattern, queue))
    for peer, items in by_peer.items():
        t.set_peer_interest(peer, 0, items)
    for subject in probes:
        r = t.route(subject)
        want_plain = {p for p, pat, q in entries if not q and matches(pat, subject)}
        want_group = {p for p, pat, q in entries if q and matches(pat, subject)}
        assert set(r.peers) == want_plain
        assert set(r.peer_groups.get("q", ())) == want_group
