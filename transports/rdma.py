"""RDMA bulk transport over verbs (pyverbs): an RC queue pair per peer.

Present only when pyverbs imports and a verbs device with an active port
exists; on a host without RDMA ``pyverbs.device.get_device_list()`` raises,
which means "no RDMA", quietly.

pyverbs comes from Debian's ``python3-pyverbs`` (PyPI's does not import on
Debian 12); ``make`` links it into the venv.

Control stays on ZeroMQ. A connection is bootstrapped over the control link
with two plain dicts (what :meth:`RdmaConnection.local_info` returns), then
moves numpy arrays as TensorPipe's ibverbs transport does (see
:mod:`transports.rdma_core` for the ring and credit rules)::

    A: conn = transport.connection();  send {"offer": conn.local_info()}   -> B
    B: conn = transport.connection();  conn.connect(offer)                 (RTS)
       send {"accept": conn.local_info()}                                  -> A
    A: conn.connect(accept)            (RTS; A tells B "ready" in-band: a SEND
                                        with immediate 0, so B never sends to
                                        a queue pair that is not up yet)

Then ``conn.send(array, meta)`` on either side, ``conn.progress()`` whenever
``conn.fileno()`` is readable (or on a timer), which returns what arrived and
which sends completed. One thread drives a connection (the node's I/O thread).
A failed queue pair raises :class:`RdmaError` (a ``TransportError``) carrying
the messages that were not delivered, so the node can send them over tcp.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mesh.errors import MessageTooLarge, ProtocolError, TimeoutError, TransportError
from transports.base import Locality, Transport
from transports.rdma_core import (
    MAX_IMM,
    FrameReader,
    Outbox,
    RegistrationCache,
    RingReader,
    RingWriter,
    SlotPool,
    encode_header,
)

__all__ = [
    "PROTOCOL_VERSION",
    "DeviceInfo",
    "Progress",
    "RdmaConnection",
    "RdmaError",
    "RdmaTransport",
    "Received",
    "ipv4_of_gid",
    "list_devices",
    "probe_device",
    "resolve_neighbour",
]

log = logging.getLogger("mesh.transports.rdma")

PROTOCOL_VERSION = 1
_IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"
_GID_TYPE_SYSFS_ROCE_V2 = 1  # ibv_query_gid_type: IBV_GID_TYPE_SYSFS_ROCE_V2
# Serialises opening verbs contexts and completion channels, so the channel's
# fd can be told apart from the fds other contexts open (see _comp_channel).
_FD_LOCK = threading.Lock()


class RdmaError(TransportError):
    """The RDMA connection cannot be used (any more). ``unsent``: the messages it
    had not delivered, as ``(msg_id, array, meta)``, oldest first: send them another
    way. ``received``: messages that had fully arrived before the failure."""

    def __init__(self, message: str, unsent: Sequence[tuple[int, np.ndarray, bytes]] = ()) -> None:
        super().__init__(message)
        self.unsent = list(unsent)
        self.received: list[Received] = []


# --------------------------------------------------------------------------- devices


def _pyverbs() -> Any:
    """The pyverbs package, or an ImportError/OSError when it is not usable here."""
    # Debian's pyverbs calls logging.basicConfig(level=INFO) when imported: the
    # application's root logger is its own, so it is put back as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import pyverbs
        import pyverbs.device  # noqa: F401 - loads libibverbs: fails without rdma-core
        import pyverbs.enums  # noqa: F401
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return pyverbs


def list_devices() -> list[str]:
    """Names of the verbs devices here; [] when pyverbs or the kernel has no RDMA."""
    try:
        pv = _pyverbs()
        return [d.name.decode() if isinstance(d.name, bytes) else str(d.name)
                for d in pv.device.get_device_list()]
    except Exception as exc:  # noqa: BLE001 - ImportError, PyverbsRDMAError: "no RDMA"
        global _SAID_NO_RDMA
        if not _SAID_NO_RDMA:  # the normal case on most hosts: say it once, at debug
            log.debug("no verbs devices: %s", exc)
            _SAID_NO_RDMA = True
        return []


_SAID_NO_RDMA = False


@dataclass(frozen=True)
class DeviceInfo:
    """A verbs device port this host can use, as peers need to know it."""

    device: str
    port: int
    gid: str
    gid_index: int
    mtu: int  # ibv_mtu enum of the active MTU (3 = 1024 bytes)
    lid: int
    link_layer: str  # "ethernet" (RoCE) or "infiniband"
    netdev: str | None = None  # RoCE: the network interface the GID belongs to

    def brochure(self) -> dict[str, Any]:
        return {"device": self.device, "port": self.port, "gid": self.gid,
                "gid_index": self.gid_index, "link_layer": self.link_layer}


def _env_gid_index() -> int | None:
    raw = os.environ.get("RDMA_GID_INDEX", "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise TransportError(f"RDMA_GID_INDEX={raw!r} is not an integer GID index") from None


def _gid_type(ctx: Any, device: str, port: int, index: int) -> int | None:
    try:
        return int(ctx.query_gid_type(port, index))
    except Exception:  # noqa: BLE001 - older pyverbs: ask sysfs
        path = f"/sys/class/infiniband/{device}/ports/{port}/gid_attrs/types/{index}"
        try:
            with open(path) as f:
                return _GID_TYPE_SYSFS_ROCE_V2 if "v2" in f.read() else 0
        except OSError:
            return None


def _discover_gid_index(ctx: Any, device: str, port: int, table_len: int) -> int:
    """The RoCE v2 IPv4-mapped GID (routable over UDP/IPv4), else the first RoCE v2, else 0."""
    first_v2 = None
    for index in range(min(table_len, 64)):
        try:
            gid = str(ctx.query_gid(port, index))
        except Exception:  # noqa: BLE001 - holes in the table
            continue
        if set(gid) <= {"0", ":"}:
            continue
        if _gid_type(ctx, device, port, index) != _GID_TYPE_SYSFS_ROCE_V2:
            continue
        if gid.startswith(_IPV4_MAPPED_PREFIX):
            return index
        if first_v2 is None:
            first_v2 = index
    return first_v2 if first_v2 is not None else 0


def _gid_netdev(device: str, port: int, index: int) -> str | None:
    try:
        with open(f"/sys/class/infiniband/{device}/ports/{port}/gid_attrs/ndevs/{index}") as f:
            return f.read().strip() or None
    except OSError:
        return None


def ipv4_of_gid(gid: str) -> str | None:
    """The IPv4 address of an IPv4-mapped GID (RoCE v2), else None."""
    if not gid.startswith(_IPV4_MAPPED_PREFIX):
        return None
    try:
        hi, lo = (int(g, 16) for g in gid[len(_IPV4_MAPPED_PREFIX):].split(":"))
    except ValueError:
        return None
    return socket.inet_ntoa(((hi << 16) | lo).to_bytes(4, "big"))


def _arp_complete(ip: str, netdev: str | None) -> bool | None:
    """The kernel's ARP entry for ``ip`` (on ``netdev``): complete, incomplete, or none."""
    try:
        with open("/proc/net/arp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[0] == ip and (netdev is None or parts[5] == netdev):
            return bool(int(parts[2], 16) & 0x2)  # ATF_COM
    return None


def resolve_neighbour(ip: str, netdev: str | None, timeout: float) -> bool | None:
    """Have the kernel resolve ``ip``'s link-layer address before a queue pair moves
    to RTR. ibv_modify_qp does it too, but pyverbs holds the GIL meanwhile: about a
    second for a neighbour not known yet (measured in the RDMA VM), longer for one
    that never answers, and every thread of the process (a node's I/O thread, its
    membership probes) stops. Here the waiting is a Python loop that lets them run.
    True: resolved; False: the address did not answer (unreachable); None: cannot
    tell (no ARP entry shows up, e.g. the peer is behind a router)."""
    if _arp_complete(ip, netdev):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if netdev:  # the route the queue pair takes: out of the GID's interface
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, netdev.encode())
                except OSError:
                    pass  # unprivileged: the ordinary route, right on a plain LAN
            sock.setblocking(False)
            sock.sendto(b"", (ip, 9))  # discard port: any datagram makes the kernel ask
    except OSError as exc:
        log.debug("cannot prompt address resolution of %s: %s", ip, exc)
        return None
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _arp_complete(ip, netdev)
        if state:
            return True
        time.sleep(0.005)
    return False if state is False else None


def probe_device(device: str | None = None, port: int | None = None,
                 gid_index: int | None = None) -> DeviceInfo | None:
    """Find the device/port to use: ``device`` or the first device with an active
    port. GID index: ``gid_index``, else env ``RDMA_GID_INDEX``, else discovered.
    None when there is none (quietly: no RDMA is the normal case)."""
    names = list_devices()
    if device is not None:
        if device not in names:
            log.debug("rdma device %s not found (devices: %s)", device, names)
            return None
        names = [device]
    pv = _pyverbs() if names else None
    for name in names:
        try:
            with _FD_LOCK:  # see RdmaConnection._comp_channel
                ctx = pv.device.Context(name=name)
        except Exception as exc:  # noqa: BLE001
            log.debug("cannot open rdma device %s: %s", name, exc)
            continue
        try:
            ports = [port] if port is not None else range(1, ctx.query_device().phys_port_cnt + 1)
            for p in ports:
                attr = ctx.query_port(p)
                if attr.state != pv.enums.IBV_PORT_ACTIVE:
                    continue
                ethernet = attr.link_layer == pv.enums.IBV_LINK_LAYER_ETHERNET
                index = gid_index if gid_index is not None else _env_gid_index()
                if index is None:
                    index = _discover_gid_index(ctx, name, p, attr.gid_tbl_len) if ethernet else 0
                gid = str(ctx.query_gid(p, index))
                return DeviceInfo(name, p, gid, index, int(attr.active_mtu), int(attr.lid),
                                  "ethernet" if ethernet else "infiniband",
                                  _gid_netdev(name, p, index) if ethernet else None)
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.debug("cannot query rdma device %s: %s", name, exc)
        finally:
            ctx.close()
    return None


# --------------------------------------------------------------------------- the plugin


class RdmaTransport(Transport):
    """The ``rdma`` bulk transport. It binds no ZeroMQ endpoint (control stays on
    zmq) and is never picked for the control link; the node asks it for
    :meth:`brochure` (device and GID, for its hello) and :meth:`connection`."""

    name = "rdma"
    rank = 20

    def __init__(self, rdma_device: str | None = None, port: int | None = None,
                 gid_index: int | None = None) -> None:
        self.rdma_device = rdma_device
        self.port = port
        self.gid_index = gid_index
        self._probed = False
        self._info: DeviceInfo | None = None
        self._lock = threading.Lock()

    def device_info(self, refresh: bool = False) -> DeviceInfo | None:
        with self._lock:
            if refresh or not self._probed:
                try:
                    self._info = probe_device(self.rdma_device, self.port, self.gid_index)
                except TransportError as exc:  # a bad RDMA_GID_INDEX: say it once
                    log.warning("rdma disabled: %s", exc)
                    self._info = None
                self._probed = True
            return self._info

    def available(self) -> bool:
        return self.device_info() is not None

    def brochure(self) -> dict[str, Any] | None:
        """What a node advertises for this transport, or None when unavailable."""
        info = self.device_info()
        return info.brochure() if info else None

    def bind_endpoints(self, listen: Sequence[str], node_id: str) -> list[str]:
        return []

    def advertise(self, bound: str) -> list[str]:
        return []

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        # Whether two GIDs are on one fabric shows only when the queue pair
        # connects; a failure there falls back to tcp.
        return True

    def pick_endpoint(self, endpoints: Sequence[str], local: Locality, peer: Locality) -> str | None:
        return None  # never the control link

    def connection(self, **options: Any) -> RdmaConnection:
        """A new, unconnected queue pair on this transport's device (see RdmaConnection)."""
        info = self.device_info()
        if info is None:
            raise TransportError(
                f"rdma is not usable on this host (devices: {list_devices() or 'none'}"
                + (f", wanted {self.rdma_device}" if self.rdma_device else "") + ")"
            )
        return RdmaConnection(info, **options)


# --------------------------------------------------------------------------- a connection


@dataclass
class Received:
    msg_id: int
    array: np.ndarray
    meta: bytes


@dataclass
class Progress:
    received: list[Received] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.received or self.sent)


@dataclass
class _OutMsg:
    msg_id: int
    array: np.ndarray  # contiguous; kept alive until its last write completes
    meta: bytes
    head: bytes = b""  # frame header + description, staged in a slot
    flat: np.ndarray | None = None  # uint8 view of the payload
    slot: int | None = None
    reg: tuple[int, int] | None = None  # registration-cache key of the payload
    lkey: int = 0
    outstanding: int = 0
    planned: bool = False


_WR_WRITE, _WR_ACK = 1, 2
_RECV_WR_ID = 0


def _strerror(pv: Any, status: int) -> str:
    try:
        from pyverbs.cq import cqe_status_to_str

        return f"{cqe_status_to_str(status)} ({status})"
    except Exception:  # noqa: BLE001
        return f"status {status}"


class RdmaConnection:
    """One RC queue pair to one peer, with an inbox ring the peer writes into.

    Not thread-safe: one thread calls everything. Options: ``ring_size`` (the
    inbox, also the most bytes a peer may have unacknowledged), ``max_write``
    (largest single RDMA write), ``copy_threshold`` (payloads up to this are
    copied into a registered staging slot; larger ones are registered in place
    through the registration cache, zero-copy), ``staging_slots``,
    ``max_message`` (refuse larger messages, None: no limit), ``connect_timeout``
    (seconds to wait for the peer's in-band "ready"), ``resolve_timeout`` (seconds
    to wait for the peer's address to resolve, see :func:`resolve_neighbour`),
    ``cache_entries`` and ``cache_bytes`` (registration cache budget).
    """

    def __init__(
        self,
        device: DeviceInfo,
        *,
        ring_size: int = 4 << 20,
        max_write: int = 1 << 20,
        copy_threshold: int = 64 << 10,
        staging_slots: int = 32,
        max_message: int | None = None,
        connect_timeout: float = 60.0,
        resolve_timeout: float = 3.0,
        cache_entries: int = 64,
        cache_bytes: int = 512 << 20,
        send_queue: int = 256,
        recv_queue: int = 256,
    ) -> None:
        if not 0 < ring_size <= MAX_IMM:
            raise ValueError(f"ring_size must be in 1..{MAX_IMM}")
        pv = _pyverbs()
        from pyverbs.cq import CQ, CompChannel
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        e = pv.enums
        self._pv = pv
        self._e = e
        self.device = device
        self.max_write = min(max_write, ring_size)
        self.copy_threshold = copy_threshold
        self.max_message = max_message
        self.connect_timeout = connect_timeout
        self.resolve_timeout = resolve_timeout
        self.state = "init"  # -> connected -> ready -> failed | closed
        self._error: RdmaError | None = None
        self._error_raised = False  # progress() reported it (with what had landed)
        self._send_queue = send_queue
        self._recv_queue = recv_queue
        try:
            with _FD_LOCK:  # see _comp_channel: opening a context adds event fds too
                self._ctx = pv.device.Context(name=device.device)
            self._pd = PD(self._ctx)
            self._channel, self._fd = self._comp_channel(CompChannel)
            self._cq = CQ(self._ctx, send_queue + recv_queue + 16, None, self._channel, 0)
            self._cq.req_notify()
            init = QPInitAttr(
                qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, sq_sig_all=1,
                cap=QPCap(max_send_wr=send_queue, max_recv_wr=recv_queue,
                          max_send_sge=1, max_recv_sge=1),
            )
            attr = QPAttr(port_num=device.port)
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
            self._qp = QP(self._pd, init, attr)  # RC + attr: left in INIT, recvs can be posted
            # The inbox: the peer writes here. Its pages are touched first (numpy does
            # it without the GIL), so registering only pins them: pyverbs holds the GIL.
            self._ring = np.empty(ring_size, dtype=np.uint8)
            self._ring.fill(0)
            self._ring_mr = MR(self._pd, ring_size,
                               e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE,
                               address=self._ring.ctypes.data)
            # Staging slots: headers, and small payloads copied whole.
            slot_size = max(copy_threshold, 0) + 4096
            self._slots = SlotPool(staging_slots, slot_size)
            self._staging = np.empty(staging_slots * slot_size, dtype=np.uint8)
            self._staging.fill(0)
            self._staging_mr = MR(self._pd, self._staging.nbytes, e.IBV_ACCESS_LOCAL_WRITE,
                                  address=self._staging.ctypes.data)
            # Receives only ever complete write-with-immediate and zero-byte acks.
            self._scratch_mr = MR(self._pd, 64, e.IBV_ACCESS_LOCAL_WRITE)
            self.cache: RegistrationCache[Any] = RegistrationCache(
                self._register, self._deregister, max_entries=cache_entries, max_bytes=cache_bytes)
            for _ in range(recv_queue):
                self._post_recv()
        except Exception as exc:
            self._teardown()
            if isinstance(exc, TransportError):
                raise
            raise RdmaError(f"cannot set up an rdma queue pair on {device.device}: {exc}") from exc
        self._psn = int.from_bytes(os.urandom(3), "big")
        self._reader = RingReader(ring_size)
        self._frames = FrameReader(max_payload=max_message)
        self._writer: RingWriter | None = None
        self._outbox: Outbox | None = None
        self._remote: dict[str, Any] = {}
        self._remote_addr = self._remote_rkey = 0
        self._connected_at = 0.0
        # Sending: waiting for a staging slot -> in the outbox -> writes in flight.
        self._next_id = 0
        self._unstaged: deque[_OutMsg] = deque()
        self._msgs: dict[int, _OutMsg] = {}
        self._wrs: dict[int, tuple[int, int]] = {}  # wr_id -> (kind, msg_id or ack bytes)
        self._next_wr = 1
        self._ack_owed = 0
        # Receiving: the frame being assembled.
        self._dest: np.ndarray | None = None
        self._dest_bytes: np.ndarray | None = None
        self._dest_meta = b""
        # For the blocking helpers.
        self._inbox: deque[Received] = deque()
        self._done: set[int] = set()
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0,
                      "messages_received": 0, "writes": 0, "acks_sent": 0}

    # ------------------------------------------------------------------ setup

    def _comp_channel(self, cls: Any) -> tuple[Any, int | None]:
        # pyverbs does not expose the channel's fd; it is the one fd that creating
        # it adds (anon_inode:[infinibandevent]). Without it we poll on a timer.
        with _FD_LOCK:
            before = _infiniband_event_fds()
            channel = cls(self._ctx)
            new = sorted(_infiniband_event_fds() - before)
        fd = new[0] if len(new) == 1 else None
        self._poller = select.poll()  # not select(): fds past 1024 are fine
        if fd is not None:
            os.set_blocking(fd, False)
            self._poller.register(fd, select.POLLIN)
        return channel, fd

    def _register(self, addr: int, size: int) -> Any:
        from pyverbs.mr import MR

        # Send buffers are only read by the NIC: no access flags, so read-only
        # arrays (np.frombuffer of bytes, memory maps) register too.
        return MR(self._pd, size, 0, address=addr)

    def _deregister(self, mr: Any) -> None:
        mr.close()

    def local_info(self) -> dict[str, Any]:
        """What the peer needs to connect: carry it in a control message as is."""
        d = self.device
        return {
            "v": PROTOCOL_VERSION, "device": d.device, "port": d.port, "gid": d.gid,
            "gid_index": d.gid_index, "lid": d.lid, "mtu": d.mtu, "qpn": self._qp.qp_num,
            "psn": self._psn, "ring_addr": self._ring_mr.buf, "ring_rkey": self._ring_mr.rkey,
            "ring_size": self._ring.nbytes, "connected": self.state != "init",
        }

    def connect(self, remote: Mapping[str, Any]) -> None:
        """Move the queue pair to RTS towards ``remote`` (the peer's local_info()).

        If the peer was already connected when it sent its info, it is waiting
        for our in-band "ready": send it, and we are ready. Otherwise wait for
        the peer's "ready" (see progress()) before sending anything."""
        if self.state != "init":
            raise TransportError(f"rdma connection is {self.state}, cannot connect it again")
        try:
            if int(remote["v"]) != PROTOCOL_VERSION:
                raise TransportError(
                    f"peer speaks rdma protocol v{remote['v']}, this node v{PROTOCOL_VERSION}")
            qpn, psn = int(remote["qpn"]), int(remote["psn"])
            ring_addr, rkey = int(remote["ring_addr"]), int(remote["ring_rkey"])
            writer = RingWriter(int(remote["ring_size"]))
            gid, mtu, lid = str(remote["gid"]), int(remote["mtu"]), int(remote.get("lid", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"malformed rdma connection info from peer: {exc!r}") from None
        ip = ipv4_of_gid(gid) if self.device.link_layer == "ethernet" else None
        if ip is not None and resolve_neighbour(ip, self.device.netdev, self.resolve_timeout) is False:
            raise self._fail(
                f"cannot connect the rdma queue pair {self.device.device} -> {remote.get('device')} "
                f"(gid {gid}): {ip} did not answer ARP on {self.device.netdev or 'its interface'} "
                f"within {self.resolve_timeout:g}s")
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self._e
        attr = QPAttr(port_num=self.device.port)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.dest_qp_num = qpn
        attr.path_mtu = min(self.device.mtu, mtu)
        attr.rq_psn = psn
        attr.sq_psn = self._psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 16  # 4.096 us * 2^16 = 0.27 s per try: emulated links are slow
        attr.retry_cnt = 6  # not 7: soft-RoCE (rxe) treats 7 as "retry forever"
        attr.rnr_retry = 7  # 7 = retry forever while the peer has no receive posted
        gr = GlobalRoute(dgid=GID(gid), sgid_index=self.device.gid_index)
        attr.ah_attr = AHAttr(port_num=self.device.port, is_global=1, gr=gr, dlid=lid)
        try:
            self._qp.to_rts(attr)
        except Exception as exc:  # noqa: BLE001 - e.g. ETIMEDOUT resolving the peer's GID
            raise self._fail(f"cannot connect the rdma queue pair {self.device.device} -> "
                             f"{remote.get('device')} (gid {gid}): {exc}") from None
        self._remote = dict(remote)
        self._remote_addr, self._remote_rkey = ring_addr, rkey
        self._writer = writer
        # max_message is checked on the payload in send(), before anything is queued
        self._outbox = Outbox(writer, max_write=min(self.max_write, writer.capacity))
        self._connected_at = time.monotonic()
        self.state = "connected"
        if remote.get("connected"):
            self._post_send_imm(0)  # "ready": the peer may send now
            self.state = "ready"
            self._pump()

    # ------------------------------------------------------------------ sending

    def send(self, array: np.ndarray, meta: bytes = b"") -> int:
        """Queue ``array`` (with opaque ``meta`` bytes) for the peer; returns its message id.

        The array must not be modified until the send completes (progress() lists
        its id in ``sent``): large arrays are sent from their own memory."""
        self._check()
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise TypeError(f"rdma sends raw array bytes; dtype {arr.dtype} holds Python objects")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # the wire carries C order
        if self.max_message is not None and arr.nbytes > self.max_message:
            raise MessageTooLarge(
                f"a {arr.nbytes}-byte array exceeds this rdma connection's max_message "
                f"({self.max_message} bytes)")
        msg = _OutMsg(self._next_id, arr, bytes(meta))
        msg.head = head = self._head(msg)
        if len(head) > self._slots.size:
            raise MessageTooLarge(
                f"meta and shape take {len(head)} bytes; at most {self._slots.size} fit a "
                "staging slot (raise copy_threshold or send less meta)")
        self._next_id += 1
        self._msgs[msg.msg_id] = msg
        self._unstaged.append(msg)
        self._pump()
        return msg.msg_id

    def _head(self, msg: _OutMsg) -> bytes:
        descr = np.lib.format.dtype_to_descr(msg.array.dtype)
        block = msgpack.packb([descr, list(msg.array.shape), msg.meta], use_bin_type=True)
        return encode_header(msg.msg_id, len(block), msg.array.nbytes) + block

    def _stage(self, msg: _OutMsg) -> bool:
        slot = self._slots.acquire()
        if slot is None:
            return False
        head = msg.head
        base = self._slots.offset(slot)
        flat = msg.array.reshape(-1).view(np.uint8) if msg.array.nbytes else np.empty(0, np.uint8)
        msg.slot, msg.flat = slot, flat
        self._staging[base : base + len(head)] = np.frombuffer(head, np.uint8)
        assert self._outbox is not None
        if flat.nbytes <= self.copy_threshold and len(head) + flat.nbytes <= self._slots.size:
            self._staging[base + len(head) : base + len(head) + flat.nbytes] = flat
            self._outbox.push(msg.msg_id, [len(head) + flat.nbytes])
        else:
            addr = flat.ctypes.data
            mr = self.cache.acquire(addr, flat.nbytes, owner=msg.array)
            msg.reg, msg.lkey = (addr, flat.nbytes), mr.lkey
            self._outbox.push(msg.msg_id, [len(head), flat.nbytes])
        return True

    def _sq_room(self) -> int:
        return self._send_queue - len(self._wrs)

    def _pump(self) -> None:
        """Post what credits and the send queue allow: owed acks first, then writes."""
        if self.state != "ready":
            return
        if self._ack_owed and self._sq_room() > 0:
            owed, self._ack_owed = self._ack_owed, 0
            self._post_send_imm(owed)
        while self._unstaged and self._stage(self._unstaged[0]):
            self._unstaged.popleft()
        assert self._outbox is not None
        # Keep a few send-queue entries for acks, so credits always flow back.
        room = self._sq_room() - 8
        if room <= 0:
            return
        for w in self._outbox.plan(room):
            msg = self._msgs[w.frame]
            if w.part == 0:
                assert msg.slot is not None
                src = self._staging.ctypes.data + self._slots.offset(msg.slot) + w.part_offset
                lkey = self._staging_mr.lkey
            else:
                assert msg.flat is not None
                src = msg.flat.ctypes.data + w.part_offset
                lkey = msg.lkey
            msg.outstanding += 1
            msg.planned = w.last
            self._post_write(src, lkey, w.ring_offset, w.length, msg.msg_id)

    def _post_write(self, src: int, lkey: int, ring_offset: int, length: int, msg_id: int) -> None:
        from pyverbs.wr import SGE, SendWR

        wr_id = self._new_wr(_WR_WRITE, msg_id)
        wr = SendWR(wr_id=wr_id, opcode=self._e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(src, length, lkey)], imm_data=socket.htonl(length))
        wr.set_wr_rdma(self._remote_rkey, self._remote_addr + ring_offset)
        self._post(wr, wr_id)
        self.stats["writes"] += 1
        self.stats["bytes_sent"] += length

    def _post_send_imm(self, value: int) -> None:
        """A zero-byte SEND with immediate: 0 = "ready", n > 0 = n bytes consumed."""
        from pyverbs.wr import SGE, SendWR

        wr_id = self._new_wr(_WR_ACK, value)
        wr = SendWR(wr_id=wr_id, opcode=self._e.IBV_WR_SEND_WITH_IMM, num_sge=1,
                    sg=[SGE(self._scratch_mr.buf, 0, self._scratch_mr.lkey)],
                    imm_data=socket.htonl(value))
        self._post(wr, wr_id)
        if value:
            self.stats["acks_sent"] += 1

    def _new_wr(self, kind: int, ref: int) -> int:
        wr_id = self._next_wr
        self._next_wr += 1
        self._wrs[wr_id] = (kind, ref)
        return wr_id

    def _post(self, wr: Any, wr_id: int) -> None:
        try:
            self._qp.post_send(wr)
        except Exception as exc:  # noqa: BLE001
            self._wrs.pop(wr_id, None)
            raise self._fail(f"posting to the rdma queue pair failed: {exc}") from None

    def _post_recv(self) -> None:
        from pyverbs.wr import SGE, RecvWR

        self._qp.post_recv(RecvWR(wr_id=_RECV_WR_ID, num_sge=1,
                                  sg=[SGE(self._scratch_mr.buf, 64, self._scratch_mr.lkey)]))

    # ------------------------------------------------------------------ progress

    def fileno(self) -> int | None:
        """A file descriptor that becomes readable when progress() has work
        (register it in the node's poller), or None: call progress() on a timer."""
        return self._fd

    def progress(self) -> Progress:
        """Handle completions: land writes, hand out complete messages, return
        credits, post more writes. Never blocks. Raises RdmaError when the queue
        pair failed (the peer died, a write was refused, the peer broke the protocol);
        the first time, even when the failure was found elsewhere (a send), with the
        messages that had landed in ``received``: they are intact."""
        if self._error_raised or self.state == "closed":
            self._check()
        try:
            try:
                return self._progress()
            except ProtocolError as exc:
                raise self._fail(f"the rdma peer ({self._remote.get('device')}) broke the "
                                 f"protocol: {exc}") from None
        except RdmaError:
            self._error_raised = True
            raise

    def _progress(self) -> Progress:
        out = Progress()
        self._drain_channel()
        while True:
            n, wcs = self._cq.poll(32)
            for wc in wcs:
                self._on_completion(wc, out)
            if n < 32:
                break
        if self.state == "connected" and time.monotonic() - self._connected_at > self.connect_timeout:
            self._fail(f"the rdma peer ({self._remote.get('device')}) did not report ready "
                       f"within {self.connect_timeout:.0f}s")
        self._read_ring(out)  # what landed before a failure is intact: hand it out
        if self._error is not None:
            self._error.received.extend(out.received)
            raise self._error
        owed = self._reader.take_ack()
        if owed:
            self._ack_owed += owed
        self._pump()
        return out

    def _drain_channel(self) -> None:
        if self._fd is None:
            return
        got = 0
        while self._poller.poll(0):
            self._channel.get_cq_event(self._cq)
            got += 1
        if got:
            self._cq.ack_events(got)
            self._cq.req_notify()  # re-arm before polling: nothing is missed

    def _on_completion(self, wc: Any, out: Progress) -> None:
        e = self._e
        if wc.status != e.IBV_WC_SUCCESS:
            if self.state in ("failed", "closed"):
                return
            what = self._wrs.get(wc.wr_id, (0, 0))[0]
            op = {_WR_WRITE: "rdma write", _WR_ACK: "credit ack"}.get(what, "receive")
            self._fail(f"rdma {op} to {self._remote.get('device', 'peer')} failed: "
                       f"{_strerror(self._pv, wc.status)}")
            return
        if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
            n = socket.ntohl(wc.imm_data)
            self._reader.on_write(n)
            self.stats["bytes_received"] += n
            self._post_recv()
        elif wc.opcode == e.IBV_WC_RECV:
            n = socket.ntohl(wc.imm_data)
            self._post_recv()
            if n == 0:
                if self.state == "connected":
                    self.state = "ready"
            else:
                assert self._writer is not None
                self._writer.on_ack(n)
        else:
            kind, ref = self._wrs.pop(wc.wr_id, (0, 0))
            if kind == _WR_WRITE:
                msg = self._msgs[ref]
                msg.outstanding -= 1
                if msg.planned and msg.outstanding == 0:
                    self._finish_send(msg)
                    out.sent.append(msg.msg_id)

    def _finish_send(self, msg: _OutMsg) -> None:
        del self._msgs[msg.msg_id]
        if msg.slot is not None:
            self._slots.release(msg.slot)
        if msg.reg is not None:
            self.cache.release(*msg.reg)
        self.stats["messages_sent"] += 1

    def _read_ring(self, out: Progress) -> None:
        fr, ring = self._frames, self._reader
        while ring.readable:
            part, missing = fr.need()
            if part == FrameReader.PAYLOAD and self._dest is None:
                self._alloc_dest()
            n = min(missing, ring.contiguous())
            if n:
                off = ring.consume(n)
                if part == FrameReader.PAYLOAD:
                    assert self._dest_bytes is not None
                    self._dest_bytes[fr.payload_offset : fr.payload_offset + n] = self._ring[off : off + n]
                    fr.advance_payload(n)
                else:
                    fr.feed(self._ring[off : off + n].tobytes())
            done = fr.take_done()
            if done is not None:
                header, _ = done
                if self._dest is None:  # no payload bytes at all
                    self._alloc_dest(done[1], header.payload_len)
                assert self._dest is not None
                out.received.append(Received(header.msg_id, self._dest, self._dest_meta))
                self.stats["messages_received"] += 1
                self._dest = self._dest_bytes = None
            elif not n:
                break

    def _alloc_dest(self, block: bytes | None = None, payload_len: int | None = None) -> None:
        fr = self._frames
        if block is None:
            assert fr.header is not None and fr.meta is not None
            block, payload_len = fr.meta, fr.header.payload_len
        try:
            descr, shape, meta = msgpack.unpackb(block, raw=False)
            dtype = np.lib.format.descr_to_dtype(descr)
            arr = np.empty(tuple(shape), dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise ProtocolError(f"malformed rdma frame description: {exc}") from None
        if arr.nbytes != payload_len or dtype.hasobject:
            raise ProtocolError(f"rdma frame says {payload_len} bytes for a {dtype}{tuple(shape)} array")
        self._dest, self._dest_meta = arr, bytes(meta)
        self._dest_bytes = arr.reshape(-1).view(np.uint8) if arr.nbytes else np.empty(0, np.uint8)

    # ------------------------------------------------------------------ errors and closing

    def _fail(self, message: str) -> RdmaError:
        """Mark the connection failed (the first failure is the one reported)."""
        if self._error is None:
            log.debug("%s", message)  # raised to the caller, who says what it does about it
            self._error = RdmaError(message, self.unsent())
            self.state = "failed"
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.state == "closed":
            raise RdmaError("the rdma connection is closed")

    @property
    def credits(self) -> int:
        """Bytes we may still write into the peer's ring (0 before connect)."""
        return self._writer.credits if self._writer else 0

    @property
    def peer_ring_size(self) -> int:
        return self._writer.capacity if self._writer else 0

    def unsent(self) -> list[tuple[int, np.ndarray, bytes]]:
        """Messages queued or in flight and not confirmed delivered, oldest first."""
        return [(m.msg_id, m.array, m.meta) for m in self._msgs.values()]

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._teardown()

    def _teardown(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is not None:
            try:
                cache.clear()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            try:
                ctx.close()  # closes the PD, MRs, CQ, QP and channel it owns
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the rdma context: %s", exc)

    def __enter__(self) -> RdmaConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ blocking helpers

    def wait(self, timeout: float) -> None:
        """Sleep until the completion channel fires or ``timeout`` passes."""
        if self._fd is None:
            time.sleep(min(timeout, 0.001))
        else:
            self._poller.poll(max(0, int(timeout * 1000)))

    def _run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            p = self.progress()
            self._inbox.extend(p.received)
            self._done.update(p.sent)
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"rdma {what} did not finish within {timeout:.0f}s (state {self.state}, "
                    f"credits {self._writer.credits if self._writer else 'n/a'}); is the peer "
                    "calling progress()?")
            self.wait(min(left, 0.5))

    def wait_ready(self, timeout: float = 60.0) -> None:
        self._run_until(lambda: self.state == "ready", timeout, "connection setup")

    def send_array(self, array: np.ndarray, meta: bytes = b"", timeout: float = 60.0) -> int:
        """send() and wait until the peer's ring has all of it."""
        msg_id = self.send(array, meta)
        self._run_until(lambda: msg_id in self._done, timeout, f"send of message {msg_id}")
        self._done.discard(msg_id)
        return msg_id

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued send has completed."""
        self._run_until(lambda: not self._msgs, timeout, f"flush of {len(self._msgs)} messages")
        self._done.clear()

    def recv_array(self, timeout: float = 60.0) -> Received:
        """The next message from the peer."""
        self._run_until(lambda: bool(self._inbox), timeout, "receive")
        return self._inbox.popleft()


def _infiniband_event_fds() -> set[int]:
    fds = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                fds.add(int(name))
        except (OSError, ValueError):
            continue
    return fds
