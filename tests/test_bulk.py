"""The bulk-channel interface (transports/bulk.py): a channel plugged into a node
carries arrays through the engine's generic send and receive paths, which know no
kind of channel by name, and status() names it per peer."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from meshproc import wait_until

import mesh
from transports.bulk import BulkChannel

pytestmark = pytest.mark.timeout(30)


class MemoryChannel(BulkChannel):
    """A toy channel between nodes of one process: the array's bytes wait in a dict,
    the socket carries only the key."""

    name = "mem"
    hello_key = "mem"
    flag = 1 << 6  # a header flag no other channel uses
    store: dict[str, bytes] = {}

    def __init__(self, node):
        self.node = node
        self.peers: set[str] = set()
        self.sent = self.opened = 0

    def offer(self):
        return True

    def accept(self, peer, hello):
        if hello.get(self.hello_key) is True:
            self.peers.add(peer.id)

    def in_use(self, link):
        return link.peer_id in self.peers

    def send_array(self, link, peer_id, frames_for, payload, nbytes, track):
        if peer_id not in self.peers:
            return None
        key = uuid.uuid4().hex
        self.store[key] = bytes(payload[1])
        self.sent += 1
        return ("carried", frames_for(self.flag, [payload[0], key.encode()]),
                lambda: self.store.pop(key, None))

    def open_array(self, peer, descriptor):
        data = self.store.pop(descriptor.decode())
        self.opened += 1
        return memoryview(data), len(data)

    def stats(self, link):
        return {"sent": self.sent, "opened": self.opened} if link.peer_id in self.peers else None


def node_with(cluster, name, channel=True, **kwargs):
    node = mesh.Node(name, cluster=cluster, discovery="none", listen=("inproc://auto",), **kwargs)
    if channel:
        node._add_bulk(MemoryChannel(node))
    return node.start()


def test_a_plugged_in_channel_carries_arrays_and_shows_in_status(cluster):
    a = node_with(cluster, "a")
    b = node_with(cluster, "b", seeds=a.endpoints)
    try:
        b.wait_for_peers(1, timeout=10)
        sub = b.subscribe("arr")
        a.wait_for_subscribers("arr", 1, timeout=10)
        assert wait_until(lambda: a.status()["peers"][0]["bulk"] == "mem", 5), a.status()["peers"]
        arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
        a.publish("arr", arr)
        a.publish("arr", b"bytes stay on the socket")
        got = sub.next(timeout=5).array()
        np.testing.assert_array_equal(got, arr)
        assert sub.next(timeout=5).data == b"bytes stay on the socket"
        row = a.status()["peers"][0]
        assert row["mem"] == {"sent": 1, "opened": 0} and row["shm"] is None, row
        (mine,) = [c for c in b._bulk if c.name == "mem"]
        assert mine.opened == 1
    finally:
        b.close()
        a.close()


def test_without_the_channel_on_both_sides_arrays_stay_on_the_socket(cluster):
    a = node_with(cluster, "a")
    b = node_with(cluster, "b", channel=False, seeds=a.endpoints)
    try:
        b.wait_for_peers(1, timeout=10)
        sub = b.subscribe("arr")
        a.wait_for_subscribers("arr", 1, timeout=10)
        arr = np.arange(64, dtype=np.int32)
        a.publish("arr", arr)
        np.testing.assert_array_equal(sub.next(timeout=5).array(), arr)
        row = a.status()["peers"][0]
        assert row["bulk"] == "inproc" and row["mem"] is None, row
    finally:
        b.close()
        a.close()
