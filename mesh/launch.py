"""Launchers: what torchrun, SLURM or a plain environment tell a node about its job.

    with mesh.Node.from_env() as node:          # Node kwargs from the launcher's variables
        group = node.group_from_env()           # every rank; group.rank == RANK

:func:`plan` is pure: it maps an environment (a dict, not ``os.environ``
itself) to the ``mesh.Node`` keyword arguments and the rank/size the
launcher assigned. ``Node.from_env`` and ``Node.group_from_env`` are thin
calls into :func:`node_from_env` and :func:`group_from_env` here. No thread
or socket is owned by this module.

Which launcher (the first that matches):

1. torchrun / ``torch.distributed`` (``RANK`` and ``WORLD_SIZE``; also
   ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).
2. SLURM (``SLURM_PROCID`` and ``SLURM_NTASKS``; ``SLURM_JOB_ID``,
   ``SLURM_STEP_ID``, ``SLURM_STEP_NODELIST`` or ``SLURM_JOB_NODELIST``,
   ``SLURM_LOCALID``).
3. Plain environment (Kubernetes, scripts): ``ZMESH_SEEDS`` (comma-separated
   endpoints, ``tcp://host:port`` or ``dns://name:port``), ``ZMESH_RANK``
   (or a Kubernetes Indexed Job's ``JOB_COMPLETION_INDEX``), ``ZMESH_SIZE``.

In every mode ``ZMESH_CLUSTER``, ``ZMESH_SECRET``, ``ZMESH_SEEDS`` (added to
the launcher's seed) and ``ZMESH_LISTEN`` (comma-separated listen endpoints)
apply, and keyword arguments given to ``Node.from_env(**overrides)`` win
over everything.

The rendezvous port. Under torchrun and SLURM, rank 0 is the seed: it listens
on ``tcp://0.0.0.0:PORT`` and every other rank seeds with
``tcp://MASTER_ADDR:PORT`` (SLURM without ``MASTER_ADDR``: the first host of
the step's node list, where ``srun`` places task 0). ``PORT`` is
``ZMESH_PORT`` when set, else ``MASTER_PORT + 1`` (torch's own TCPStore
holds ``MASTER_PORT`` itself; two jobs on one host need MASTER_PORTs at least
2 apart), else under SLURM ``12000 + (SLURM_JOB_ID * 16 + SLURM_STEP_ID) %
8000`` (12000-19999: below Linux's ephemeral ports, 32768 up, and away from
torch's usual 29500). Other ranks listen on a free port. Discovery is
``"static"`` (the job's seed is known; no mDNS), the cluster is
``torch-MASTER_ADDR-MASTER_PORT`` or ``slurm-JOBID.STEPID`` so that two jobs
never mix, and node names are ``rank-<RANK>@<host>``, zero-padded so that
the group's ranks (members sorted by name) equal the launcher's.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ConfigError

__all__ = [
    "SLURM_PORT_BASE",
    "SLURM_PORT_SPAN",
    "TORCH_PORT_OFFSET",
    "Plan",
    "expand_nodelist",
    "free_master_port",
    "group_from_env",
    "node_from_env",
    "plan",
    "rank_name",
]

TORCH_PORT_OFFSET = 1  # rank 0's mesh port = MASTER_PORT + 1 (MASTER_PORT is torch's store)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 8000


def free_master_port(host: str = "127.0.0.1", tries: int = 100) -> int:
    """A MASTER_PORT for a job started by hand on this host: a port P with P free
    (torch's store) and P + 1 free (rank 0's mesh node, see TORCH_PORT_OFFSET).
    Another process may still take either before the job binds them."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + TORCH_PORT_OFFSET))
            except OSError:
                continue
        return port
    raise ConfigError(f"no two adjacent free ports on {host} after {tries} tries; "
                      "set MASTER_PORT (and ZMESH_PORT) by hand")


@dataclass(frozen=True)
class Plan:
    """What the environment says: the launcher, this process's rank, and the Node kwargs."""

    launcher: str  # "torchrun" | "slurm" | "env"
    rank: int | None = None
    size: int | None = None
    local_rank: int | None = None
    node_kwargs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- reading variables


def _int(env: Mapping[str, str], key: str, *, minimum: int = 0) -> int | None:
    text = env.get(key)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not an integer; fix or unset it") from None
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")
    return value


def _port(env: Mapping[str, str], key: str) -> int | None:
    port = _int(env, key, minimum=1)
    if port is not None and port > 65535:
        raise ConfigError(f"{key}={port} is not a TCP port (1-65535)")
    return port


def _list(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(key, "").split(",") if p.strip())


def _tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def rank_name(rank: int, size: int, host: str = "") -> str:
    """``rank-03@host``: zero-padded to the width of ``size - 1``, so that names sort
    in rank order (the group ranks its members by name)."""
    width = len(str(max(size - 1, 0)))
    name = f"rank-{rank:0{width}d}"
    return f"{name}@{host[:100]}" if host else name


def _check_rank(launcher: str, rank_key: str, rank: int, size_key: str, size: int) -> None:
    if size < 1:
        raise ConfigError(f"{size_key}={size}: a job has at least one rank")
    if rank >= size:
        raise ConfigError(f"{rank_key}={rank} is not below {size_key}={size} ({launcher})")


# ---------------------------------------------------------------------- SLURM node lists

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"node list {text!r}: nested '[' at {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"node list {text!r}: ']' without '[' at {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"node list {text!r}: '[' not closed")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, text: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if m is None:
            raise ConfigError(
                f"node list {text!r}: {item!r} in [{body}] is not N or N-M (digits)"
            )
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ConfigError(f"node list {text!r}: range {item!r} runs backwards")
        if hi - lo >= 1_000_000:
            raise ConfigError(f"node list {text!r}: range {item!r} is implausibly large")
        width = len(lo_s)  # SLURM keeps the zero padding of the range's start
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """Expand a SLURM host list: ``"node[01-03,07],gpu5"`` -> ``["node01", "node02",
    "node03", "node07", "gpu5"]``, in order (as ``scontrol show hostnames``).

    Several bracket groups in one name give their product (``"r[1-2]n[1-2]"`` ->
    r1n1, r1n2, r2n1, r2n2); zero padding follows each range's start (``[8-10]``
    -> 8, 9, 10; ``[08-10]`` -> 08, 09, 10). Malformed lists raise ConfigError.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"node list {text!r} is empty")
    hosts: list[str] = []
    for entry in _split_top(text.strip()):
        entry = entry.strip()
        if not entry:
            raise ConfigError(f"node list {text!r} has an empty entry")
        pieces = re.split(r"(\[[^\[\]]*\])", entry)
        choices: list[list[str]] = []
        for piece in pieces:
            if piece.startswith("["):
                choices.append(_expand_ranges(piece[1:-1], text))
            elif piece:
                if any(c in piece for c in "[], \t"):
                    raise ConfigError(f"node list {text!r}: unexpected character in {piece!r}")
                choices.append([piece])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


# ---------------------------------------------------------------------- the plan


def plan(env: Mapping[str, str], host: str = "") -> Plan:
    """Map a launcher's environment to a :class:`Plan` (pure; ``host`` names this
    machine in node names, e.g. ``socket.gethostname()``). See the module docstring."""
    extra_seeds = _list(env, "ZMESH_SEEDS")
    kwargs: dict[str, Any] = {}
    rank = size = local = None
    if "RANK" in env or "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1)
        if rank is None or size is None:
            raise ConfigError("RANK and WORLD_SIZE must both be set (torchrun sets both); "
                              "set the missing one or unset the other")
        _check_rank(launcher, "RANK", rank, "WORLD_SIZE", size)
        local = _int(env, "LOCAL_RANK")
        addr, master_port = env.get("MASTER_ADDR", "").strip(), _port(env, "MASTER_PORT")
        if not addr or master_port is None:
            raise ConfigError(
                "RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: rank 0's mesh "
                "port is MASTER_PORT + 1 on MASTER_ADDR; set both (torchrun does)"
            )
        port = _mesh_port(env, master_port + TORCH_PORT_OFFSET, "MASTER_PORT + 1")
        cluster = f"torch-{addr}-{master_port}"
    elif "SLURM_PROCID" in env:
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        size = _int(env, "SLURM_NTASKS", minimum=1) or _int(env, "SLURM_NPROCS", minimum=1)
        if rank is None or size is None:
            raise ConfigError("SLURM_PROCID is set but SLURM_NTASKS is not: run the job "
                              "with srun (it sets both), or unset SLURM_PROCID")
        _check_rank(launcher, "SLURM_PROCID", rank, "SLURM_NTASKS", size)
        local = _int(env, "SLURM_LOCALID")
        job = _int(env, "SLURM_JOB_ID")
        if job is None:
            raise ConfigError("SLURM_PROCID is set but SLURM_JOB_ID is not; run under srun")
        step = _int(env, "SLURM_STEP_ID") or 0
        master_port = _port(env, "MASTER_PORT")
        addr = env.get("MASTER_ADDR", "").strip()
        if not addr:
            nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                               "SLURM_NODELIST") if env.get(k, "").strip()), "")
            if not nodelist:
                raise ConfigError("SLURM_STEP_NODELIST is not set: rank 0 runs on its first "
                                  "host; run under srun, or set MASTER_ADDR")
            addr = expand_nodelist(nodelist)[0]
        if master_port is not None:
            port = _mesh_port(env, master_port + TORCH_PORT_OFFSET, "MASTER_PORT + 1")
        else:
            port = _mesh_port(env, SLURM_PORT_BASE + (job * 16 + step) % SLURM_PORT_SPAN,
                              "the SLURM job's port")
        cluster = f"slurm-{job}.{step}"
    else:
        launcher = "env"
        rank = _int(env, "ZMESH_RANK")
        if rank is None:
            rank = _int(env, "JOB_COMPLETION_INDEX")  # a Kubernetes Indexed Job
        size = _int(env, "ZMESH_SIZE", minimum=1)
        if rank is not None and size is not None:
            _check_rank(launcher, "ZMESH_RANK", rank, "ZMESH_SIZE", size)
        if rank is not None and size is None:
            raise ConfigError("ZMESH_RANK is set but ZMESH_SIZE is not: set the number of ranks")
        if extra_seeds:
            kwargs["discovery"] = "static"  # mDNS rarely crosses a cluster network
        if rank is not None and size is not None:
            kwargs["name"] = rank_name(rank, size, host)
        kwargs["seeds"] = extra_seeds
        cluster = ""
    if launcher != "env":
        assert rank is not None and size is not None
        kwargs["name"] = rank_name(rank, size, host)
        kwargs["discovery"] = "static"
        if rank == 0:
            kwargs["listen"] = (f"tcp://0.0.0.0:{port}", "ipc://auto")
            kwargs["seeds"] = extra_seeds
        else:
            kwargs["seeds"] = (_tcp(addr, port), *extra_seeds)
    cluster = env.get("ZMESH_CLUSTER", "").strip() or cluster
    if cluster:
        kwargs["cluster"] = cluster[:128]
    if env.get("ZMESH_SECRET"):
        kwargs["secret"] = env["ZMESH_SECRET"]
    listen = _list(env, "ZMESH_LISTEN")
    if listen:
        kwargs["listen"] = listen
    return Plan(launcher, rank, size, local, kwargs)


def _mesh_port(env: Mapping[str, str], default: int, what: str) -> int:
    port = _port(env, "ZMESH_PORT")
    if port is not None:
        return port
    if default > 65535:
        raise ConfigError(f"{what} = {default} is not a TCP port; set ZMESH_PORT")
    return default


# ---------------------------------------------------------------------- Node methods


def node_from_env(cls: Any, env: Mapping[str, str] | None = None, **overrides: Any) -> Any:
    """``cls(**plan(env).node_kwargs, **overrides)`` (not started); env: os.environ."""
    p = plan(os.environ if env is None else env, host=socket.gethostname())
    return cls(**{**p.node_kwargs, **overrides})


def group_from_env(node: Any, name: str = "world", timeout: float = 60.0,
                   env: Mapping[str, str] | None = None, **options: Any) -> Any:
    """The group of every rank of the job, with ``group.rank`` equal to the launcher's."""
    p = plan(os.environ if env is None else env)
    if p.size is None:
        raise ConfigError(
            "group_from_env needs the number of ranks: run under torchrun (WORLD_SIZE) or "
            "srun (SLURM_NTASKS), or set ZMESH_SIZE and ZMESH_RANK"
        )
    group = node.group(name, p.size, timeout, **options)
    if p.rank is not None and group.rank != p.rank:
        got = group.rank
        group.close()
        raise ConfigError(
            f"node {node.name!r} got rank {got} in group {name!r}, but the launcher says rank "
            f"{p.rank} ({p.launcher}): ranks follow node names, so create the node with "
            "mesh.Node.from_env() without a name= override (names rank-NNN@host)"
        )
    return group
