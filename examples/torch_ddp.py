"""DDP over the mesh: an MLP trained on 2-4 processes with ``mt.comm_hook``, checked
against DDP with Gloo's own allreduce.

    python examples/torch_ddp.py [--workers 2] [--steps 30]     # starts its ranks itself
    torchrun --nproc-per-node 2 examples/torch_ddp.py --steps 30   # or under torchrun

Every rank trains two copies of one model from the same initial weights on the
same data (generated here from a fixed seed: a random teacher labels Gaussian
points into 8 classes; each rank takes its share of every global batch). One
copy is plain ``DistributedDataParallel`` (its gradient buckets averaged by
Gloo), the other has ``model.register_comm_hook(None, mt.comm_hook(group))``:
its buckets are averaged over the mesh group ``node.group_from_env()``. The
mesh node comes from the launcher's environment (``mesh.Node.from_env()``:
rank 0 listens on MASTER_PORT + 1, beside torch's store on MASTER_PORT).

After the steps the parameters of the two copies must agree within float
tolerance on every rank, and the mesh copy must be identical on all ranks;
the script prints both step times and exits 0 with "OK" when all holds.
Needs torch (``pip install 'zmesh[torch]'``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SEED = 0
FEATURES, HIDDEN, CLASSES = 32, 128, 8
GLOBAL_BATCH = 128
BUCKET_MB = 0.05  # small buckets: several per step, so their order matters
RTOL, ATOL = 1e-4, 1e-6


# ---------------------------------------------------------------------- one rank


def make_data(torch):
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(8192, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ teacher + 0.3 * torch.randn(8192, CLASSES, generator=g)).argmax(dim=1)
    return x, y


def make_model(torch):
    torch.manual_seed(SEED)  # the same initial weights for both copies, on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def rank_main(steps: int, overlap: bool = True) -> int:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import mesh
    import mesh.torch as mt

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        with mesh.Node.from_env() as node:
            group = node.group_from_env(timeout=60.0)
            assert group.rank == rank, (group.rank, rank)
            x, y = make_data(torch)
            gloo_model = DDP(make_model(torch), bucket_cap_mb=BUCKET_MB)
            mesh_model = DDP(make_model(torch), bucket_cap_mb=BUCKET_MB)
            hook = mt.comm_hook(group, overlap=overlap)
            mesh_model.register_comm_hook(None, hook)
            runs = {"gloo": (gloo_model, torch.optim.SGD(gloo_model.parameters(), lr=0.05,
                                                         momentum=0.9), []),
                    "mesh": (mesh_model, torch.optim.SGD(mesh_model.parameters(), lr=0.05,
                                                         momentum=0.9), [])}
            losses = []
            for step in range(steps):
                lo = (step * GLOBAL_BATCH) % len(x)
                idx = torch.arange(lo, lo + GLOBAL_BATCH)[rank::world]  # this rank's share
                xb, yb = x[idx], y[idx]
                order = ("gloo", "mesh") if step % 2 else ("mesh", "gloo")
                for key in order:
                    model, opt, times = runs[key]
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()  # returns once every bucket's future resolved
                    opt.step()
                    times.append(time.perf_counter() - t0)
                    if key == "mesh":
                        losses.append(float(loss.detach()))
            hook.close()
            worst = 0.0
            with torch.no_grad():
                for (name, p_g), p_m in zip(gloo_model.module.named_parameters(),
                                            mesh_model.module.parameters(), strict=True):
                    diff = float((p_g - p_m).abs().max())
                    worst = max(worst, diff)
                    if not torch.allclose(p_g, p_m, rtol=RTOL, atol=ATOL):
                        raise SystemExit(f"rank {rank}: {name} differs: max |gloo - mesh| = "
                                         f"{diff:.3g} (rtol {RTOL}, atol {ATOL})")
            # Every rank must hold the same mesh-trained weights (DDP's invariant).
            flat = torch.cat([p.detach().reshape(-1) for p in mesh_model.parameters()])
            parts = group.allgather(flat.numpy())
            if any((part != parts[0]).any() for part in parts):
                raise SystemExit(f"rank {rank}: the mesh-trained weights differ between ranks")
            group.barrier()
            group.close()
        if rank == 0:
            med = {k: sorted(v[2][1:])[len(v[2][1:]) // 2] * 1e3 for k, v in runs.items()}
            print(f"{world} ranks, {steps} steps, {sum(p.numel() for p in mesh_model.parameters())}"
                  f" parameters: loss {losses[0]:.3f} -> {losses[-1]:.3f}; median step "
                  f"{med['mesh']:.2f} ms with the mesh hook, {med['gloo']:.2f} ms with Gloo; "
                  f"max |gloo - mesh| = {worst:.3g}", flush=True)
            print("OK: DDP with the mesh hook trained the same parameters as DDP with Gloo",
                  flush=True)
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------- launcher


def launch(workers: int, steps: int, timeout: float, extra: list[str]) -> int:
    """Start ``workers`` ranks as torchrun does: same script, an environment per rank."""
    from mesh.launch import free_master_port

    port = free_master_port()
    procs = []
    try:
        for rank in range(workers):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(workers),
                   "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                           "--steps", str(steps), *extra], env=env))
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        if any(codes):
            print(f"FAILED: rank exit codes {codes}", flush=True)
            return 1
        return 0
    except subprocess.TimeoutExpired:
        print(f"FAILED: the ranks did not finish within {timeout:.0f} s", flush=True)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="ranks to start (2-4)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-overlap", action="store_true",
                        help="run each bucket's allreduce inside the hook (comm_hook(overlap=False))")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun, or by launch() below
        return rank_main(args.steps, overlap=not args.no_overlap)
    if not 1 <= args.workers <= 4:
        parser.error("--workers: 1 to 4 ranks")
    return launch(args.workers, args.steps, args.timeout,
                  ["--no-overlap"] if args.no_overlap else [])


if __name__ == "__main__":
    sys.exit(main())
