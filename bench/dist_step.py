"""One data-parallel Adam step after backward: fastps.optim against all_reduce + torch.optim.

    torchrun --nproc-per-node 2 bench/dist_step.py [--params 16M] [--tensors 8] [--steps 20]

Each rank holds the same parameters (``--tensors`` tensors, ``--params``
float32 values in all) with a gradient already computed, as after backward.
Two systems take turns step by step:

  fastps   fastps.optim.Adam.step(): every gradient goes to the servers (one
           colocated with each rank, shared memory or in-process between
           them), which average them and apply Adam; the new parameters come
           back in place (FASTPS_OVERLAP=0: all of it happens in step())
  ddp      what DistributedDataParallel does with the gradients: copied into
           buckets of at most 25 MiB (its bucket_cap_mb), each bucket
           all_reduce'd (gloo), divided by the world size and copied back;
           then torch.optim.Adam on every rank, as constructed by default and
           with fused=True (torch's fastest CPU Adam): two systems
  allreduce+fused   the strongest hand-made baseline: every gradient
           all_reduce'd in place (no bucket copies), then fused Adam

Rank 0 prints the median milliseconds of each and the ratios to fastps. All
systems' parameters are checked to agree after the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("FASTPS_OVERLAP", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fastps  # noqa: E402
from fastps.bench._common import parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=parse_size, default=16 << 20, help="float32 values in all (16M)")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    n = args.params // args.tensors
    init = [torch.randn(n, generator=gen) for _ in range(args.tensors)]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(1 + rank * 1000 + i)) for i in range(args.tensors)]
    systems = {
        "fastps": (lambda ps: fastps.optim.Adam(ps, lr=1e-3), False),
        "ddp, Adam default": (lambda ps: torch.optim.Adam(ps, lr=1e-3), True),
        "ddp, Adam fused": (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), True),
        "allreduce+fused": (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), "per tensor"),
    }
    params = {name: [torch.nn.Parameter(t.clone()) for t in init] for name in systems}
    opts = {name: make(params[name]) for name, (make, _) in systems.items()}
    times = {name: [] for name in systems}

    def buckets(ps):
        out, cur, size = [], [], 0
        for p in ps:
            if cur and size + p.numel() * 4 > (25 << 20):
                out.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += p.numel() * 4
        return out + [cur] if cur else out

    bucketed = {name: buckets(params[name]) for name in systems}

    def step(name: str) -> None:
        for p, g in zip(params[name], grads):
            p.grad = g.clone()
        dist.barrier()
        t = time.perf_counter()
        if systems[name][1] == "per tensor":
            for p in params[name]:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        elif systems[name][1]:  # DDP's share: average the gradients, bucket by bucket
            for b in bucketed[name]:
                flat = torch.cat([p.grad for p in b])
                dist.all_reduce(flat)
                flat.div_(world)
                for p, part in zip(b, flat.split([p.numel() for p in b])):
                    p.grad.copy_(part)
        opts[name].step()
        times[name].append(time.perf_counter() - t)

    names = list(systems)
    for i in range(args.warmup + args.steps):
        k = i % len(names)  # rotating order: load from elsewhere hits every system alike
        for name in names[k:] + names[:k]:
            step(name)
    for name in names[1:]:
        for p, q in zip(params["fastps"], params[name]):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
    if rank == 0:
        med = {k: statistics.median(v[args.warmup:]) * 1e3 for k, v in times.items()}
        print(f"# Adam step after backward, {args.params / 1e6:.1f}M float32 params in {args.tensors} tensors, "
              f"{world} workers, torch {torch.__version__}, 1 thread per worker, medians of {args.steps} steps")
        for name in names:
            print(f"{name:>20}  {med[name]:8.1f} ms   {med[name] / med['fastps']:5.2f}x fastps's time")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
