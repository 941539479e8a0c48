"""A packet capture for the namespace lab (tests/test_lan_security.py): no tshark needed.

Host side, run inside a lab host (needs root: a raw AF_PACKET socket)::

    tests/harness/netns_lab.sh exec I .venv/bin/python -m tests.lansniff --iface eth0 --out FILE

captures every frame on ``--iface`` (both directions), prints ``{"ev": "ready"}`` once
the socket is bound, and stops at end of stdin (or after ``--max-seconds``). It then
reassembles the IPv4 TCP byte stream of every flow (one direction of a connection,
ordered by sequence number, retransmissions written once), writes the streams one after
another to FILE and prints a summary: ``{"ev": "done", "frames", "tcp_segments",
"tcp_bytes", "drops", "flows": [{"src", "sport", "dst", "dport", "offset", "length"}]}``
where offset/length locate each flow's stream in FILE.

Test side: :class:`Sniffer`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.lanhost import LAB_SH, ROOT

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6


# =========================================================================== host side


def _tcp_segment(frame: memoryview) -> tuple[tuple[str, int, str, int], int, bytes] | None:
    """(flow, seq, payload) of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = 14
    ihl = (frame[ip] & 0x0F) * 4
    if frame[ip] >> 4 != 4 or frame[ip + 9] != socket.IPPROTO_TCP or ihl < 20:
        return None
    total = int.from_bytes(frame[ip + 2:ip + 4], "big")
    end = min(len(frame), ip + total) if total else len(frame)  # 0: a TSO frame
    tcp = ip + ihl
    if end < tcp + 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", frame, tcp)
    data = tcp + (frame[tcp + 12] >> 4) * 4
    src = socket.inet_ntoa(bytes(frame[ip + 12:ip + 16]))
    dst = socket.inet_ntoa(bytes(frame[ip + 16:ip + 20]))
    return (src, sport, dst, dport), seq, bytes(frame[data:end])


def _reassemble(segments: dict[int, bytes]) -> bytes:
    """One direction's stream from {seq: payload}; gaps (frames not seen) are skipped."""
    first = min(segments)  # a capture starts mid-stream: order relative to the first seen
    out = bytearray()
    end = None  # relative offset of the end of ``out``
    for rel, payload in sorted(((seq - first) % (1 << 32), p) for seq, p in segments.items()):
        if end is None or rel >= end:
            out += payload
            end = rel + len(payload)
        elif rel + len(payload) > end:  # overlaps what we have: keep the new part
            out += payload[end - rel:]
            end = rel + len(payload)
    return bytes(out)


def sniff_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lansniff")
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:  # root may exceed rmem_max: no frame of a 1 MiB burst may be dropped
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.bind((args.iface, 0))
    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    print(json.dumps({"ev": "ready", "pid": os.getpid()}), flush=True)

    flows: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    frames = segments = 0
    buf = bytearray(1 << 18)  # larger than any GSO/GRO frame on a veth
    view = memoryview(buf)
    deadline = time.monotonic() + args.max_seconds
    draining = False
    while True:
        if not draining and (stop.is_set() or time.monotonic() > deadline):
            draining = True  # take what is still queued, then stop
            sock.setblocking(False)
        if not draining and not select.select([sock], [], [], 0.05)[0]:
            continue
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            break
        frames += 1
        seg = _tcp_segment(view[:n])
        if seg is None or not seg[2]:
            continue
        segments += 1
        flow, seq, payload = seg
        have = flows.setdefault(flow, {})
        if len(payload) > len(have.get(seq, b"")):
            have[seq] = payload
    stats = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    _packets, drops = struct.unpack("II", stats)
    sock.close()

    summary: list[dict[str, Any]] = []
    offset = 0
    with open(args.out, "wb") as f:
        for (src, sport, dst, dport), segs in sorted(flows.items()):
            stream = _reassemble(segs)
            f.write(stream)
            summary.append({"src": src, "sport": sport, "dst": dst, "dport": dport,
                            "offset": offset, "length": len(stream)})
            offset += len(stream)
    print(json.dumps({"ev": "done", "frames": frames, "tcp_segments": segments,
                      "tcp_bytes": offset, "drops": drops, "flows": summary}), flush=True)
    return 0


# =========================================================================== test side


class Sniffer:
    """Test-side handle: a capture on ``iface`` of lab host ``index`` into ``out``.

    Use as a context manager (the capture process never outlives it)::

        with Sniffer(prefix, 1, tmp_path / "cap.bin") as sniff:
            ...  # traffic
            result = sniff.stop()
        b"secret" in result.data, b"secret" in result.streams(40123)
    """

    def __init__(self, prefix: str, index: int, out: Path, iface: str = "eth0",
                 max_seconds: float = 60.0) -> None:
        self.out = Path(out)
        self.proc = subprocess.Popen(
            ["bash", str(LAB_SH), "exec", str(index), sys.executable, "-m", "tests.lansniff",
             "--iface", iface, "--out", str(self.out), "--max-seconds", str(max_seconds)],
            cwd=ROOT, env={**os.environ, "ZMESH_LAB": prefix},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def __enter__(self) -> Sniffer:
        return self.ready()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def ready(self, timeout: float = 20.0) -> Sniffer:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.kill()
            raise RuntimeError(f"the sniffer did not start within {timeout} s")
        line = self.proc.stdout.readline()
        if not line.startswith('{"ev": "ready"'):
            self.kill()
            raise RuntimeError(f"the sniffer failed: {line}{self.proc.stderr.read() if self.proc.stderr else ''}")
        return self

    def stop(self, timeout: float = 20.0) -> Capture:
        """End the capture; what it saw."""
        try:
            out, err = self.proc.communicate("", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the sniffer did not finish within {timeout} s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the sniffer failed ({self.proc.returncode}): {err}")
        return Capture(json.loads(out.strip().splitlines()[-1]), self.out.read_bytes())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Capture:
    """What a :class:`Sniffer` captured: ``summary`` (its "done" line) and ``data`` (every
    reassembled TCP stream, concatenated)."""

    def __init__(self, summary: dict[str, Any], data: bytes) -> None:
        self.summary = summary
        self.data = data

    def streams(self, *ports: int) -> bytes:
        """The TCP streams (both directions) of the connections from or to any of ``ports``,
        concatenated."""
        return b"".join(
            self.data[f["offset"]:f["offset"] + f["length"]] for f in self.summary["flows"]
            if f["sport"] in ports or f["dport"] in ports
        )


if __name__ == "__main__":
    sys.exit(sniff_main())
