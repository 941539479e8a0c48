#!/usr/bin/env bash
# Installs what the benchmarks compare against, only when missing: idempotent
# and quiet, so `make bench` can run it every time.
#   usage: bash bench/setup.sh [VENV_BIN]     (default: .venv/bin)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-.venv/bin}"
PY="$BIN/python"

if [ ! -x "$PY" ]; then
    echo "bench/setup.sh: no python at $PY; create the venv first (make venv)" >&2
    exit 1
fi

# The pub/sub benchmarks need only the venv itself: the mesh and pyzmq, numpy
# and msgpack, which `pip install -e .` already brought in.
"$PY" -c 'import zmq, numpy, msgpack, mesh' 2>/dev/null || {
    echo "bench/setup.sh: the venv lacks pyzmq/numpy/msgpack or the mesh; run make venv" >&2
    exit 1
}

# --- NATS reference (bench/refs.py starts it on 127.0.0.1, a free port, and
# always stops it): Debian's nats-server, from apt. apt-get update runs once per
# machine (a stamp file), and only when the package is missing.
if ! command -v nats-server >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench/setup.sh: nats-server is missing; as root: apt-get install nats-server" >&2
        exit 1
    fi
    if [ ! -f /var/lib/apt/lists/.bench-updated ]; then
        apt-get update -qq && touch /var/lib/apt/lists/.bench-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi

# --- The Python references: the Zenoh binding and nats-py (pyproject's `bench`
# extra; a venv made before they were added lacks them).
if ! "$PY" -c 'import zenoh, nats' 2>/dev/null; then
    "$BIN/pip" install -q -e "$ROOT[bench]"
fi

# --- torch for the Gloo collectives reference. Pinned: 2.13.0 is a local CPU
# wheel here; any other version would download gigabytes of CUDA packages.
if ! "$PY" -c 'import torch' 2>/dev/null; then
    "$BIN/pip" install -q torch==2.13.0
fi

exit 0
