"""Hello, interest, membership glue and the peer table (I/O thread only).

A peer becomes known through a hello (or gossip, discovery, a seed); the hello
carries its endpoints, its interest snapshot and what bulk channels it offers
(shared memory: a beacon; RDMA: a brochure). This module owns ``_peers`` and
creates and closes links (``_add_peer``, ``_close_link``); interest updates
go into the routing table under ``_lock``. SWIM (mesh/membership.py) decides
liveness; its actions are carried out here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import zmq

import transports as transport_plugins
from mesh import wire
from mesh.engine.common import _CTL_SUFFIX, _LIVE
from mesh.engine.dispatch import _CallbackSub
from mesh.engine.link import Link
from mesh.errors import (
    ProtocolError,
)
from mesh.membership import Event as MemberEvent
from mesh.membership import Membership
from mesh.membership import Send as MemberSend
from mesh.message import Message
from mesh.peers import Peer, parse_summary
from transports.base import Locality

log = logging.getLogger("mesh")


class Handshake:
    """Peers joining and leaving, interest, SWIM actions (mixin of ``mesh.Node``)."""

    def _init_handshake(self) -> None:
        self._peers: dict[str, Peer] = {}  # the peer table (I/O thread writes it)
        self._tombstones: dict[str, float] = {}
        self._members: Membership | None = None
        self._peer_callbacks: list = []
        self._rejoin: dict[str, float] = {}  # dead peer id -> next hello
        self._rejoin_socks: dict[str, Any] = {}

    def _peer_name(self, peer_id: str) -> str:
        peer = self._peers.get(peer_id)
        return peer.name if peer else peer_id

    def _hello_body(self, ack: bool, via: str | None = None) -> dict:
        version, entries = self._interest_snapshot()
        body = {
            **self._self_summary(),
            "iv": version,
            "int": entries,
            "peers": [p.summary() for p in self._peers.values() if p.state == "alive"],
            "ack": ack,
        }
        if self._keys is not None:
            body["sec"] = self._keys.fingerprint
        if via is not None:
            body["via"] = via
        for channel in self._bulk:  # the bulk channels we can offer
            offer = channel.offer()
            if offer is not None:
                body[channel.hello_key] = offer
        return body

    def _interest_snapshot(self) -> list:
        with self._lock:
            return [self._routing.local_version, [list(k) for k in self._routing.local_interest()]]

    def _on_hello(self, body: Any, now: float) -> None:
        info = parse_summary(body)
        if info["cluster"] != self.cluster:
            self.counters.drops["wrong_cluster"] += 1
            return
        if info["id"] == self.id:
            return  # we are our own seed
        if body.get("sec", "") != (self._keys.fingerprint if self._keys is not None else ""):
            # Over tcp/ipc CURVE already refused such a node; inproc has no handshake,
            # so nodes of one process with different credentials must not mix either.
            self._command(("foreign", info["id"], info["name"], "sec" in body))
            return
        iv, entries = body.get("iv"), body.get("int")
        if type(iv) is not int:
            raise ProtocolError("hello without interest version", "malformed")
        entries = wire.check_interest_entries(entries)
        peer = self._peers.get(info["id"])
        # A suspect peer is a live one (SWIM may still refute): its hello must not
        # rebuild the link, which would drop what is queued on it.
        is_new = peer is None or peer.state not in (*_LIVE, "joining")
        if not is_new and peer is not None and peer.locality != Locality(info["host"], info["proc"]):
            # Discovery guessed the locality; the peer's own hello may allow a better link.
            is_new = True
        if is_new:
            self._tombstones.pop(info["id"], None)
            peer = self._add_peer(info, now)
            if peer is None:
                return
        assert peer is not None
        peer.last_seen = now
        via = body.get("via")
        if type(via) is str and via in self._seed_socks and body.get("ack"):
            self._seed_peer[via] = peer.id
        was_joining = peer.state == "joining"
        was_suspect = peer.state == "suspect"
        # Interest first: whoever sees the peer alive must also see what it wants.
        self._set_interest(peer, iv, entries)
        peer.state = "alive"
        self._unknown.hello(peer.id)
        if was_suspect and not is_new:
            self._peer_event("alive", peer)  # it spoke: as good as a refutation
        if was_joining or is_new:
            peer.joined_at = now
            self._rejoin.pop(peer.id, None)
            self._close_probe(peer.id)
            for other in list(self._peers.values()):
                # Names are unique in a cluster: a new id under a known name is that
                # node restarted, and its old self is gone.
                if other.name == peer.name and other.id != peer.id and other.state in (*_LIVE, "joining"):
                    self._peer_gone(other, "left")
            self._peer_event("joined", peer)
            log.info("%s: peer %s joined over %s", self.name, peer.name, peer.link.transport if peer.link else "?")
        gossip = body.get("peers")
        if type(gossip) is list:
            for summary in gossip:
                try:
                    self._introduce(parse_summary(summary), now)
                except ProtocolError:
                    self.counters.drops["malformed"] += 1
        if not body.get("ack"):
            self._send_control(peer.id, wire.HELLO, self._hello_body(True, via if type(via) is str else None))
        elif was_joining or is_new:
            # Our interest may have changed since the hello this peer saw (e.g. one
            # sent through a seed before we knew its id): send it whole once more.
            self._send_control(peer.id, wire.INTEREST_FULL, self._interest_snapshot())
        for channel in self._bulk:  # after our answer: the peer knows us then
            channel.accept(peer, body)
        if was_joining or is_new:
            # Tell everyone else about the newcomer so the mesh becomes full.
            summary = [peer.summary()]
            for other in list(self._peers.values()):
                if other.id != peer.id and other.state == "alive":
                    self._send_control(other.id, wire.PEERS, summary)
            with self._changed:
                self._changed.notify_all()
            # After our hello answer, on the same pipe: the peer knows us by then.
            self._swim(self._members.add_member(peer.id, peer.summary(), now=now))

    def _add_peer(self, info: dict, now: float) -> Peer | None:
        locality = Locality(info["host"], info["proc"])
        chosen = transport_plugins.choose(self._transports, self._locality, info["eps"], locality)
        if chosen is None:
            self.counters.drops["no_common_transport"] += 1
            log.warning(
                "%s: cannot reach peer %s: no shared transport (ours %s, theirs %s)",
                self.name, info["name"], [t.name for t in self._transports], list(info["eps"]),
            )
            return None
        old = self._peers.get(info["id"])
        if old is not None and old.link is not None:
            self._close_link(old)
        transport, endpoint = chosen
        sock = self._dial(endpoint, self.id.encode(), self.options["sndhwm"])
        try:
            ctl = self._dial(endpoint, self.id.encode() + _CTL_SUFFIX, 10_000)
        except ProtocolError:
            sock.close(linger=0)
            raise
        peer = Peer(
            id=info["id"],
            name=info["name"],
            cluster=info["cluster"],
            endpoints={k: list(v) for k, v in info["eps"].items()},
            locality=locality,
            last_seen=now,
        )
        peer.link = Link(sock, ctl, transport, endpoint, peer.counters, peer.id)
        self._peers[peer.id] = peer
        self._links[peer.id] = peer.link
        return peer

    def _dial(self, endpoint: str, identity: bytes, hwm: int) -> Any:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply_client(sock)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ProtocolError(
                f"peer advertised an unusable endpoint {endpoint!r}: {exc}", "bad_endpoint"
            ) from None
        return sock

    def _introduce(self, info: dict, now: float) -> None:
        """A peer we heard of through gossip or discovery: connect and say hello."""
        if info["id"] == self.id or info["cluster"] != self.cluster:
            return
        peer = self._peers.get(info["id"])
        if peer is not None and peer.state in ("alive", "joining"):
            return
        if info["id"] in self._tombstones:
            return  # recently dead: only a hello from the node itself revives it
        peer = self._add_peer(info, now)
        if peer is not None:
            self._send_control(peer.id, wire.HELLO, self._hello_body(False))

    def _permitted(self, peer: Peer, entries: list) -> list:
        """The interest entries the policy lets ``peer`` have: we never send it the rest."""
        policy = self._policy
        if policy is None:
            return entries
        kept = []
        for entry in entries:
            if policy.may_subscribe(peer.name, entry[0]):
                kept.append(entry)
            else:
                self._denied(peer, "subscribe", entry[0])
        return kept

    def _denied(self, peer: Peer, action: str, subject: str) -> None:
        self.denials[(peer.name, action)] += 1
        self.counters.drops["permission_denied"] += 1
        key = (f"{peer.id}/{action}", subject)
        if key not in self._logged_once and len(self._logged_once) < 1000:
            self._logged_once.add(key)
            log.warning("%s: denied %s %s to %s (roles %s) by the policy; dropped",
                        self.name, action, subject, peer.name,
                        sorted(self._policy.roles_of(peer.name)) if self._policy else [])

    def _set_interest(self, peer: Peer, version: int, entries: list) -> None:
        entries = self._permitted(peer, entries)
        with self._lock:
            bad = self._routing.set_peer_interest(peer.id, version, entries)
        if bad:
            self.counters.drops["invalid_interest"] += len(bad)
        self._prune_windows(peer)
        with self._changed:
            self._changed.notify_all()

    def _on_interest(self, peer: Peer, body: Any) -> None:
        if type(body) is not list or len(body) != 3 or type(body[0]) is not int:
            raise ProtocolError("malformed interest update", "malformed")
        version = body[0]
        adds = self._permitted(peer, wire.check_interest_entries(body[1]))
        removes = wire.check_interest_entries(body[2])
        with self._lock:
            if version <= self._routing.peer_version(peer.id):
                return  # already covered by a snapshot
            bad = self._routing.apply_peer_delta(peer.id, version, adds, removes)
        if bad is None:
            self._send_control(peer.id, wire.SYNC, None)  # we missed one: resync
        elif bad:
            self.counters.drops["invalid_interest"] += len(bad)
        self._prune_windows(peer)
        with self._changed:
            self._changed.notify_all()

    def _prune_windows(self, peer: Peer) -> None:
        """Close credit windows of subscriptions the peer no longer has."""
        link = peer.link
        if link is None or not link.windows:
            return
        with link.cond:
            for sid in [sid for sid in link.windows if self._routing.params(peer.id, sid) is None]:
                link.windows.pop(sid).close("unsubscribed")
            link.cond.notify_all()

    def _self_summary(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "cluster": self.cluster,
            "eps": self._advertised,
            "host": self._locality.host,
            "proc": self._locality.process,
        }

    def _swim(self, actions: list) -> None:
        self._timers_stale = True  # the I/O loop looks at membership's deadline again
        for action in actions:
            if type(action) is MemberSend:
                self._send_control(action.to, wire.SWIM, action.message)
            elif type(action) is MemberEvent:
                self._on_member_event(action.kind, action.member)

    def _on_member_event(self, kind: str, member: Any) -> None:
        peer = self._peers.get(member.id)
        if kind in ("dead", "left"):
            if peer is not None and peer.state in (*_LIVE, "joining"):
                self._peer_gone(peer, kind)
        elif kind == "suspect":
            if peer is not None and peer.state == "alive":
                peer.state = "suspect"
                self._peer_event("suspect", peer)
        elif kind in ("joined", "alive", "updated"):
            if peer is not None and peer.state == "suspect":
                peer.state = "alive"
                self._peer_event("alive", peer)
            elif peer is None or peer.state in ("dead", "left"):
                # Gossip says it lives (or it refuted its death): connect again. SWIM's
                # incarnation numbers already ruled out stale news, so no tombstone check.
                try:
                    info = parse_summary(member.meta)
                except ProtocolError:
                    self.counters.drops["malformed_member"] += 1
                    return
                self._tombstones.pop(info["id"], None)
                self._introduce(info, time.monotonic())

    def _peer_event(self, event: str, peer: Peer) -> None:
        self.membership_events[event] += 1
        info = peer.info()
        for callback in self._peer_callbacks:
            self._dispatch.put((_CallbackSub(callback, event), info))
        subject = f"_mesh.peers.{event}"
        route = self._route(subject, internal=True)
        if route.local:
            data = msgpack.packb(info._asdict())
            for sub in route.local:
                self._io_deliver(sub, Message(subject, data, None, self.id, 0, node=self))

    def _peer_gone(self, peer: Peer, state: str) -> None:
        self._timers_stale = True
        was = peer.state
        peer.state = state
        peer.gone_at = time.monotonic()
        for channel in self._bulk:
            channel.peer_gone(peer)
        self._tombstones[peer.id] = time.monotonic()
        self._close_link(peer)
        with self._lock:
            self._routing.remove_peer(peer.id)
        for key in [k for k in self._last_seq if k[0] == peer.id]:
            del self._last_seq[key]
        why = (
            f"peer {peer.name} ({peer.link.endpoint if peer.link else '?'}) "
            + ("left the mesh" if state == "left" else "stopped answering")
        )
        for channel in list(self._channels.values()):
            channel._peer_lost(peer.id, why)
        if was in _LIVE:
            self._peer_event(state, peer)
            log.info("%s: peer %s is %s", self.name, peer.name, state)
        if state == "dead" and peer.link is not None:
            # Maybe only a partition: keep saying hello for a while (nobody else will).
            self._rejoin[peer.id] = time.monotonic() + self.options["rejoin_interval"]
        with self._changed:
            self._changed.notify_all()

    def _close_link(self, peer: Peer) -> None:
        if peer.link is not None:
            self._links.pop(peer.id, None)
            peer.link.close()
