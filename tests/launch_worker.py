"""A rank started the way a launcher starts one (tests/test_launch.py): a fresh
process whose environment is all it knows. It forms the job's group from the
environment, allreduces, and prints one JSON line with what it saw."""

from __future__ import annotations

import json
import sys

import numpy as np

import mesh


def main() -> int:
    with mesh.Node.from_env() as node:
        group = node.group_from_env(timeout=30.0)
        x = np.full(3, float(group.rank + 1))
        total = group.allreduce(x)
        print(json.dumps({
            "name": node.name, "cluster": node.cluster, "rank": group.rank, "size": group.size,
            "sum": total.tolist(), "members": [m.name for m in group.members],
            "endpoints": node.endpoints,
        }), flush=True)
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
