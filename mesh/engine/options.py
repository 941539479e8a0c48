"""The node's options: defaults, and the checks that say what to give instead."""

from __future__ import annotations

import logging
import math
from typing import Any

from mesh.errors import (
    ConfigError,
)
from mesh.membership import MemberConfig

log = logging.getLogger("mesh")

_DEFAULT_OPTIONS: dict[str, Any] = {
    "heartbeat_interval": 0.5,  # seconds between pings to each peer
    "peer_timeout": 3.0,  # silence after which a peer is declared dead
    "seed_interval": 0.5,  # hello retry period towards seeds not yet joined
    "tombstone": 30.0,  # how long gossip cannot resurrect a dead peer id
    "max_message_size": 1 << 30,  # bytes per payload frame
    "sndhwm": 10_000,  # messages queued per peer before publish drops (or waits)
    "rcvhwm": 100_000,
    "interfaces": None,  # zeroconf: restrict to these interfaces
    "membership": None,  # dict of mesh.membership.MemberConfig fields (SWIM timers)
    "rejoin_interval": 1.0,  # hello retry period towards peers declared dead
    # Micro-batching: in a burst (a small message right after the previous one to
    # the same peer) messages wait at most batch_delay to share one ZeroMQ message;
    # otherwise a message leaves at once. batch_bytes=0 turns it off. 512 KiB: each
    # batch costs its receiver (and a fan-out's publisher, per link) a fixed ~30 µs
    # or more, so 1 KiB messages are batched by the hundred as 64 B ones are, and the
    # half window (Link.batch_cap) ends a batch first. 64 KiB (~60 of 1 KiB) cost
    # 5.3-5.8 µs of CPU per delivered message in 1 KiB 1->4, 512 KiB 3.4-3.6
    # (bench/README.md, 2026-12-06; 16 KiB had halved the 1 KiB 1->1 rate before).
    "batch_bytes": 524288,
    "batch_delay": 0.0005,
    # Arrays of at least shm_threshold bytes to a peer on this host travel through
    # shared memory (transports/shm.py); shm=False keeps them on the socket.
    "shm": True,
    "shm_threshold": 1 << 20,
    # Arrays of at least rdma_threshold bytes to a peer that also has RDMA go through
    # an RC queue pair (transports/rdma.py) when both have it; rdma_device picks the
    # verbs device (default: the first with an active port).
    "rdma_device": None,
    "rdma_threshold": 64 << 10,
    # Between nodes linked over tcp (shm impossible or off), the collectives send
    # segments of at least tcp_bulk_threshold bytes over a plain TCP stream per peer
    # pair (transports/tcp_bulk.py: received straight into place); tcp_bulk=False
    # keeps them on ZeroMQ. Off in secured clusters (the stream is not encrypted).
    "tcp_bulk": True,
    "tcp_bulk_threshold": 256 << 10,
    # Per-subject permissions (mesh/policy.py): a dict, or a JSON/TOML file. Checked
    # by this node before it publishes or subscribes, and on what peers send it.
    "policy": None,
    # A handler subscribed with inline=True runs on the I/O thread that read its
    # message; one that takes longer than this (seconds) moves to the dispatch thread.
    "inline_budget": 0.01,
}

# (type, minimum) of each numeric option; minimum is exclusive for floats.
_OPTION_RULES: dict[str, tuple[type, float]] = {
    "heartbeat_interval": (float, 0.0),
    "peer_timeout": (float, 0.0),
    "seed_interval": (float, 0.0),
    "tombstone": (float, 0.0),
    "rejoin_interval": (float, 0.0),
    "batch_delay": (float, 0.0),
    "inline_budget": (float, 0.0),
    "max_message_size": (int, 1),
    "shm_threshold": (int, 1),
    "rdma_threshold": (int, 1),
    "tcp_bulk_threshold": (int, 1),
    "sndhwm": (int, 1),
    "rcvhwm": (int, 1),
}

def _check_options(options: dict[str, Any]) -> None:
    for key, (kind, minimum) in _OPTION_RULES.items():
        value = options[key]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > minimum
            ok = ok and math.isfinite(value)
            want = "a positive number of seconds"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            want = f"an integer >= {int(minimum)}"
        if not ok:
            raise ConfigError(f"option {key}={value!r}: give {want}")
    batch = options["batch_bytes"]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise ConfigError(f"option batch_bytes={batch!r}: give an integer >= 0 (0 = no batching)")
    if options["peer_timeout"] <= options["heartbeat_interval"]:
        raise ConfigError(
            "peer_timeout must be longer than heartbeat_interval, or every peer looks dead"
        )
    membership = options["membership"]
    if membership is not None:
        if not isinstance(membership, dict):
            raise ConfigError("membership= takes a dict of MemberConfig fields, e.g. {'probe_interval': 0.5}")
        try:
            MemberConfig(**membership)
        except TypeError as exc:
            raise ConfigError(f"membership={membership!r}: {exc}") from None
    interfaces = options["interfaces"]
    if interfaces is not None and (
        isinstance(interfaces, str) or not all(isinstance(i, str) for i in interfaces)
    ):
        raise ConfigError('interfaces must be a list of interface names or addresses, e.g. ["eth0"]')

