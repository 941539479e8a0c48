"""Shared machinery of the namespace-lab tests (tests/test_lan.py, tests/test_lan_security.py).

Not a test module: the test modules import it and define their own thin fixtures,

    require_lab(__file__)                 # module level: skip (or fail) with the reason

    @pytest.fixture(scope="module")
    def lab_prefix():
        with namespace_lab(HOSTS, tag="zl") as prefix:
            yield prefix

so that each module builds (and always removes) its own lab of network namespaces.
Nodes run as ``python -m tests.lanhost`` in the lab hosts (tests/lanhost.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.lanhost import LAB_SH, LanHost, lab

MESH_STATUS = str(Path(sys.executable).parent / "mesh-status")


def why_not() -> str | None:
    """None when the namespace lab can run here, else why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces need root)"
    if not LAB_SH.exists():
        return f"{LAB_SH} is missing"
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip()}"
    return None


def cannot(reason: str, *, who: str, module: bool = False) -> None:
    """Skip (printing why), or fail when CI demands that these tests run (ZMESH_REQUIRE_LAB=1)."""
    if os.environ.get("ZMESH_REQUIRE_LAB") == "1":
        pytest.fail(f"ZMESH_REQUIRE_LAB=1 but the namespace lab cannot run: {reason}", pytrace=False)
    print(f"\n{who}: skipped: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=module)


def require_lab(test_file: str) -> None:
    """At module level: skip the whole module (or fail, in CI) when the lab cannot run."""
    reason = why_not()
    if reason is not None:
        who = f"tests/{Path(test_file).name}"
        cannot(f"namespace lab unavailable: {reason}", who=who, module=True)


@contextmanager
def namespace_lab(hosts: int, tag: str = "zl") -> Iterator[str]:
    """A lab of ``hosts`` hosts with a prefix unique to this run; torn down on exit
    (which kills whatever still runs inside and deletes the namespaces)."""
    prefix = f"{tag}{os.getpid() % 100000}{uuid.uuid4().hex[:3]}-"
    try:
        lab(prefix, "setup", str(hosts))
        yield prefix
    finally:
        lab(prefix, "teardown")


class Lan:
    """The nodes of one test, plus the lab faults it applied."""

    def __init__(self, prefix: str, cluster: str) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.hosts: list[LanHost] = []
        self.faulted: set[int] = set()

    def spawn(self, index: int, name: str | None = None, **opts: Any) -> LanHost:
        """Start a node on lab host ``index`` (named h<index> unless ``name``), without
        waiting for it; ``opts``: LanHost's secret_file, policy, seeds."""
        host = LanHost(self.prefix, index, name or f"h{index}", self.cluster, **opts)
        self.hosts.append(host)
        return host

    def start(self, *indices: int, **opts: Any) -> list[LanHost]:
        """One node per lab host, started in parallel; returns when all are ready."""
        new = [self.spawn(i, **opts) for i in indices]
        return [h.ready() for h in new]

    def full_mesh(self, hosts: list[LanHost], timeout: float = 10.0) -> float:
        """Wait until every node sees all the others; seconds it took."""
        t0 = time.monotonic()
        for h in hosts:
            names = h.call("wait_peers", n=len(hosts) - 1, timeout=timeout)
            assert set(names) >= {o.name for o in hosts if o is not h}, (h.name, names)
        return time.monotonic() - t0

    def lab(self, *args: str) -> None:
        if args[0] in ("loss", "rate", "cut"):
            self.faulted.add(int(args[1]))
        lab(self.prefix, *args)

    def status_cli(
        self, index: int, *args: str, timeout: float = 20.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run mesh-status inside lab host ``index`` (ZMESH_SECRET only if given in ``env``)."""
        base = {k: v for k, v in os.environ.items() if k != "ZMESH_SECRET"}
        return subprocess.run(
            ["bash", str(LAB_SH), "exec", str(index), MESH_STATUS, *args],
            env={**base, **(env or {}), "ZMESH_LAB": self.prefix}, capture_output=True,
            text=True, timeout=timeout,
        )

    def close(self) -> None:
        for i in sorted(self.faulted):  # heal first, so that goodbyes get through
            for action in ("heal", "clear"):
                try:
                    lab(self.prefix, action, str(i))
                except Exception as exc:  # teardown of the module still removes everything
                    print(f"netns_lab.sh {action} {i} failed: {exc}", file=sys.stderr)
        for h in self.hosts:
            h.quit()  # all at once: each close says goodbye for a moment
        for h in self.hosts:
            h.stop()


@contextmanager
def lan_of(prefix: str, cluster: str | None = None) -> Iterator[Lan]:
    """A :class:`Lan` whose nodes are stopped on exit, also when the test failed."""
    net = Lan(prefix, cluster or f"lan-{uuid.uuid4().hex[:8]}")
    try:
        yield net
    finally:
        net.close()


def logs(*hosts: LanHost) -> str:
    return "\n".join(h.log() for h in hosts)


def msgs(host: LanHost, sid: str) -> list[dict[str, Any]]:
    """The messages ``host`` received so far on subscription ``sid``."""
    return [e for e in list(host.events) if e.get("ev") == "msg" and e["sid"] == sid]


def pubsub(pub: LanHost, subs: Sequence[LanHost], subject: str, timeout: float = 5.0) -> None:
    """``subs`` subscribe (if not yet), ``pub`` publishes once; each must receive it."""
    sid = f"sid-{uuid.uuid4().hex[:6]}"
    for s in subs:
        s.call("subscribe", pattern=subject, sid=sid)
    pub.call("wait_subscribers", subject=subject, count=len(subs), timeout=timeout)
    payload = f"from {pub.name} {uuid.uuid4().hex[:6]}"
    pub.call("publish", subject=subject, data=payload)
    for s in subs:
        got = s.wait_event(lambda e: e.get("ev") == "msg" and e["sid"] == sid, timeout)
        assert got is not None, f"{s.name} did not receive {subject!r} from {pub.name}\n{logs(pub, s)}"
        assert got["data"] == payload and got["subject"] == subject
