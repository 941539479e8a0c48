"""The node's bulk channels (transports/bulk.py), best first, and what the generic
paths look up in them. Set up once with the node; read by every thread."""

from __future__ import annotations

from mesh.engine.bulk_rdma import RdmaChannel
from mesh.engine.bulk_shm import ShmChannel
from mesh.engine.bulk_tcp import TcpChannel
from transports.bulk import BulkChannel


class BulkSet:
    """The bulk channels of a node (mixin of ``mesh.Node``)."""

    def _init_bulk(self) -> None:
        self._bulk: list[BulkChannel] = []
        for channel in (TcpChannel(self), RdmaChannel(self), ShmChannel(self)):
            self._add_bulk(channel)

    def _add_bulk(self, channel: BulkChannel) -> None:
        """Put a bulk channel first in line (before the node starts: its hello offers it)."""
        self._bulk.insert(0, channel)
        # Those that may keep an order with the data socket (send and receive
        # paths ask only them, and only cheaply).
        self._bulk_ordering = [c for c in self._bulk
                               if type(c).keeps_order is not BulkChannel.keeps_order]
        self._bulk_tickers = [c for c in self._bulk if type(c).tick is not BulkChannel.tick]
        self._bulk_kinds = {kind: c for c in self._bulk for kind in c.kinds}
        self._bulk_named = {c.name: c for c in self._bulk}
        self._bulk_flags = 0
        for channel in self._bulk:
            self._bulk_flags |= channel.flag
