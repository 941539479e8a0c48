"""Launchers (mesh/launch.py): the pure env -> plan mapping, SLURM node lists, and
real processes started with torchrun-, SLURM- and plain-style environments."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mesh
from mesh import launch
from mesh.launch import expand_nodelist, free_master_port, plan, rank_name

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TORCHRUN = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
         "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-09]"}


# ---------------------------------------------------------------------- plan(): torchrun


def test_torchrun_rank_seeds_rank0_on_master_port_plus_one():
    p = plan(TORCHRUN, host="h1")
    assert (p.launcher, p.rank, p.size, p.local_rank) == ("torchrun", 2, 4, 0)
    assert p.node_kwargs == {"name": "rank-2@h1", "discovery": "static",
                             "seeds": ("tcp://10.0.0.5:29501",),
                             "cluster": "torch-10.0.0.5-29500"}


def test_torchrun_rank0_listens_on_the_mesh_port():
    p = plan({**TORCHRUN, "RANK": "0"})
    assert p.node_kwargs["listen"] == ("tcp://0.0.0.0:29501", "ipc://auto")
    assert p.node_kwargs["seeds"] == ()
    assert p.node_kwargs["name"] == "rank-0"


def test_torchrun_zmesh_variables_apply_and_port_override():
    env = {**TORCHRUN, "ZMESH_PORT": "7000", "ZMESH_CLUSTER": "exp-42", "ZMESH_SECRET": "s3",
           "ZMESH_SEEDS": "tcp://10.0.0.9:1, dns://extra.svc:7777"}
    kw = plan(env).node_kwargs
    assert kw["seeds"] == ("tcp://10.0.0.5:7000", "tcp://10.0.0.9:1", "dns://extra.svc:7777")
    assert kw["cluster"] == "exp-42" and kw["secret"] == "s3"


def test_torchrun_ipv6_master_is_bracketed():
    kw = plan({**TORCHRUN, "MASTER_ADDR": "fd00::5"}).node_kwargs
    assert kw["seeds"] == ("tcp://[fd00::5]:29501",)


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "not below"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 must be >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "65535"}, "ZMESH_PORT"),
])
def test_torchrun_bad_env_says_what_to_set(env, words):
    with pytest.raises(mesh.ConfigError, match=words):
        plan(env)


def test_torchrun_wins_over_slurm():
    # `srun torchrun ...`: SLURM_PROCID numbers the torchrun agents, RANK the workers.
    assert plan({**SLURM, **TORCHRUN}).launcher == "torchrun"


# ---------------------------------------------------------------------- plan(): SLURM


def test_slurm_seeds_the_first_host_of_the_step():
    p = plan(SLURM, host="gpu08")
    port = launch.SLURM_PORT_BASE + (4242 * 16) % launch.SLURM_PORT_SPAN
    assert (p.launcher, p.rank, p.size, p.local_rank) == ("slurm", 1, 3, 1)
    assert p.node_kwargs == {"name": "rank-1@gpu08", "discovery": "static",
                             "seeds": (f"tcp://gpu07:{port}",), "cluster": "slurm-4242.0"}
    assert 12000 <= port < 20000


def test_slurm_rank0_listens_and_steps_get_their_own_port_and_cluster():
    p0 = plan({**SLURM, "SLURM_PROCID": "0"})
    p0s = plan({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_ID": "1"})
    assert p0.node_kwargs["listen"][0] != p0s.node_kwargs["listen"][0]
    assert p0.node_kwargs["cluster"] != p0s.node_kwargs["cluster"]


def test_slurm_uses_master_addr_and_port_when_the_script_exports_them():
    p = plan({**SLURM, "MASTER_ADDR": "gpu09", "MASTER_PORT": "29500"})
    assert p.node_kwargs["seeds"] == ("tcp://gpu09:29501",)


def test_slurm_falls_back_to_the_job_nodelist():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert plan({**env, "SLURM_JOB_NODELIST": "a[3-4]"}).node_kwargs["seeds"][0].startswith(
        "tcp://a3:")
    with pytest.raises(mesh.ConfigError, match="SLURM_STEP_NODELIST"):
        plan(env)


@pytest.mark.parametrize("drop, words", [("SLURM_NTASKS", "SLURM_NTASKS"),
                                         ("SLURM_JOB_ID", "SLURM_JOB_ID")])
def test_slurm_incomplete_env(drop, words):
    with pytest.raises(mesh.ConfigError, match=words):
        plan({k: v for k, v in SLURM.items() if k != drop})


# ---------------------------------------------------------------------- plan(): plain env


def test_plain_env_kubernetes_style():
    env = {"ZMESH_SEEDS": "dns://trainers.default.svc:7777", "ZMESH_CLUSTER": "exp",
           "ZMESH_SECRET": "k", "ZMESH_LISTEN": "tcp://0.0.0.0:7777,ipc://auto",
           "JOB_COMPLETION_INDEX": "3", "ZMESH_SIZE": "12"}
    p = plan(env, host="trainer-3")
    assert (p.launcher, p.rank, p.size) == ("env", 3, 12)
    assert p.node_kwargs == {"discovery": "static", "name": "rank-03@trainer-3",
                             "seeds": ("dns://trainers.default.svc:7777",), "cluster": "exp",
                             "secret": "k", "listen": ("tcp://0.0.0.0:7777", "ipc://auto")}


def test_plain_env_zmesh_rank_wins_and_empty_env_is_the_plain_node():
    assert plan({"ZMESH_RANK": "1", "JOB_COMPLETION_INDEX": "5", "ZMESH_SIZE": "8"}).rank == 1
    p = plan({})
    assert (p.launcher, p.rank, p.size, p.node_kwargs) == ("env", None, None, {"seeds": ()})


def test_plain_env_rank_without_size():
    with pytest.raises(mesh.ConfigError, match="ZMESH_SIZE"):
        plan({"ZMESH_RANK": "0"})


def test_node_from_env_overrides_win(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "ZMESH_")) or key in TORCHRUN:
            monkeypatch.delenv(key)
    monkeypatch.setenv("ZMESH_CLUSTER", "from-env")
    monkeypatch.setenv("ZMESH_SEEDS", "tcp://127.0.0.1:1")
    node = mesh.Node.from_env(cluster="mine", name="n1")
    try:
        assert (node.cluster, node.name, node.seeds, node.discovery_mode) == (
            "mine", "n1", ("tcp://127.0.0.1:1",), "static")
    finally:
        node.close()


def test_group_from_env_without_a_size_says_what_to_set(monkeypatch, make_node):
    node = make_node()
    with pytest.raises(mesh.ConfigError, match="ZMESH_SIZE"):
        launch.group_from_env(node, env={})


# ---------------------------------------------------------------------- names and node lists


@given(st.integers(1, 5000), st.text("abcxyz-.0123456789", max_size=12))
def test_rank_names_sort_in_rank_order(size, host):
    ranks = random.Random(size).sample(range(size), min(size, 50))
    names = sorted(rank_name(r, size, host) for r in ranks)
    assert names == [rank_name(r, size, host) for r in sorted(ranks)]


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("tux[8-10]", ["tux8", "tux9", "tux10"]),
    ("tux[08-10]", ["tux08", "tux09", "tux10"]),
    ("a,b", ["a", "b"]),
    ("gpu5", ["gpu5"]),
    ("n[1-2],login,m[3]", ["n1", "n2", "login", "m3"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("node[1-2].cluster.local", ["node1.cluster.local", "node2.cluster.local"]),
    (" x[1-2] ", ["x1", "x2"]),
])
def test_expand_nodelist_examples(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["", "node[", "node]", "node[1-2", "n[[1]]", "n[a-b]",
                                  "n[3-1]", "n[]", "a,,b", "n[1-2]x]", "a b", "n[1-99999999]"])
def test_expand_nodelist_refuses_malformed(text):
    with pytest.raises(mesh.ConfigError, match="node list"):
        expand_nodelist(text)


_LITERAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=6)
_RANGE = st.tuples(st.integers(0, 120), st.integers(0, 12), st.integers(1, 4))  # lo, count, width


def _bracket(ranges: list[tuple[int, int, int]]) -> tuple[str, list[str]]:
    parts, names = [], []
    for lo, count, width in ranges:
        hi = lo + count
        lo_s = str(lo).zfill(width)
        parts.append(lo_s if count == 0 else f"{lo_s}-{str(hi).zfill(width)}")
        names += [str(i).zfill(width) for i in range(lo, hi + 1)]
    return "[" + ",".join(parts) + "]", names


@st.composite
def _nodelists(draw):
    text_entries, expected = [], []
    for _ in range(draw(st.integers(1, 4))):
        pieces = [(draw(_LITERAL), None)]
        for _ in range(draw(st.integers(0, 2))):  # bracket groups, each maybe followed by text
            pieces.append(_bracket(draw(st.lists(_RANGE, min_size=1, max_size=3))))
            if draw(st.booleans()):
                pieces.append((draw(_LITERAL), None))
        text = "".join(p[0] for p in pieces)
        hosts = [""]
        for literal, choices in pieces:
            hosts = [h + c for h in hosts for c in (choices or [literal])]
        text_entries.append(text)
        expected += hosts
    return ",".join(text_entries), expected


@given(_nodelists())
def test_expand_nodelist_matches_a_generated_list(case):
    text, expected = case
    assert expand_nodelist(text) == expected


# ---------------------------------------------------------------------- real processes

LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "JOB_COMPLETION_INDEX")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_KEYS and not k.startswith(("SLURM_", "ZMESH_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _run_ranks(envs: list[dict[str, str]], timeout: float = 60.0) -> list[dict]:
    """Start one process per env (as a launcher does), all at once; their JSON lines."""
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "launch_worker.py")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for env in envs]
    try:
        results = []
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank process {i} exited {proc.returncode}:\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)


def _check_job(results: list[dict], ranks: list[int]) -> None:
    size = len(ranks)
    for rank, res in zip(ranks, results, strict=True):
        assert res["rank"] == rank and res["size"] == size
        assert res["sum"] == [size * (size + 1) / 2] * 3
        assert res["name"].startswith(f"rank-{rank}@")
    assert len({r["cluster"] for r in results}) == 1


def test_torchrun_env_three_processes_form_the_group_by_rank():
    port = free_master_port()
    base = {**_clean_env(), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}
    # Started in reverse order: rank 0 is not first, and ranks still follow RANK.
    ranks = [2, 1, 0]
    results = _run_ranks([{**base, "RANK": str(r), "LOCAL_RANK": str(r)} for r in ranks])
    _check_job(results, ranks)
    assert results[0]["cluster"] == f"torch-127.0.0.1-{port}"
    assert any(ep.endswith(f":{port + 1}") for ep in results[2]["endpoints"])  # rank 0


def test_slurm_env_faked_in_processes():
    rng = random.Random()
    for _ in range(200):  # a job id whose derived port is free here
        job = rng.randrange(10_000, 10_000_000)
        port = launch.SLURM_PORT_BASE + (job * 16) % launch.SLURM_PORT_SPAN
        if _port_free(port):
            break
    base = {**_clean_env(), "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": "localhost,fakenode[02-03]"}
    results = _run_ranks([{**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}
                          for r in (1, 0)])
    _check_job(results, [1, 0])
    assert results[0]["cluster"] == f"slurm-{job}.0"
    assert any(ep.endswith(f":{port}") for ep in results[1]["endpoints"])


def test_plain_env_processes_with_zmesh_seeds():
    port = free_master_port()
    base = {**_clean_env(), "ZMESH_SIZE": "2", "ZMESH_CLUSTER": f"plain-{port}",
            "ZMESH_SEEDS": f"tcp://127.0.0.1:{port}"}
    results = _run_ranks([
        {**base, "ZMESH_RANK": "1"},
        {**base, "ZMESH_RANK": "0", "ZMESH_LISTEN": f"tcp://127.0.0.1:{port},ipc://auto"},
    ])
    _check_job(results, [1, 0])
    assert results[0]["cluster"] == f"plain-{port}"


TORCHRUN_BIN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text``, wherever lines were split or joined."""
    decoder = json.JSONDecoder()
    found, at = [], text.find("{")
    while at != -1:
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at = text.find("{", at + 1)
            continue
        found.append(obj)
        at = text.find("{", end)
    return found


@pytest.mark.skipif(not os.path.exists(TORCHRUN_BIN),
                    reason="torchrun not installed (pip install 'zmesh[torch]')")
@pytest.mark.parametrize("mode", ["static", "c10d"])
def test_real_torchrun_starts_ranks_that_form_the_group(mode):
    """torchrun itself: with a fixed master port, and with the c10d rendezvous (which
    picks MASTER_PORT itself and sets MASTER_ADDR to a host name)."""
    import signal

    port = free_master_port()
    if mode == "static":
        args = ["--nproc-per-node", "3", "--master-port", str(port)]
    else:
        args = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--nnodes",
                "1", "--nproc-per-node", "3"]
    proc = subprocess.Popen([TORCHRUN_BIN, *args, os.path.join(HERE, "launch_worker.py")],
                            env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-3000:]
    # Under torchrun the ranks share one stdout: two ranks' lines can meet on one line.
    results = sorted(_json_objects(out), key=lambda r: r["rank"])
    _check_job(results, [0, 1, 2])
    if mode == "static":
        assert results[0]["cluster"] == f"torch-127.0.0.1-{port}"


def test_free_master_port_leaves_room_for_rank_zeros_mesh_node():
    port = free_master_port()
    assert _port_free(port) and _port_free(port + launch.TORCH_PORT_OFFSET)
