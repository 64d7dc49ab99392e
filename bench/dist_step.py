"""A data-parallel training step: fastps against DDP's all_reduce + torch.optim, in one run.

    torchrun --nproc-per-node 2 bench/dist_step.py [--params 16M] [--tensors 8] [--steps 20]
    torchrun --nproc-per-node 2 bench/dist_step.py --mode backward [--clip 1.0] [--scaler]

Two modes; in both, every system takes its turn step by step (rotating order,
so load from elsewhere hits every system alike), and rank 0 prints the median
milliseconds of each and the ratios to fastps's.

``--mode step`` (the default): the optimizer step after backward. Each rank
holds the same parameters (``--tensors`` tensors, ``--params`` float32 values
in all) with a gradient already computed, as after backward:

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

``--mode backward``: a whole iteration, forward + backward + (``--scaler``:
GradScaler unscale_) + (``--clip``: clip_grad_norm_) + step + zero_grad, of an
MLP (``--layers`` Linear layers ``--width`` wide, ``--batch`` rows per rank),
with AdamW. With overlap a gradient leaves during backward, so edits between
backward and step() can only be compared with a real backward in the loop:

  fastps            fastps.optim.AdamW (FASTPS_OVERLAP as set; the gradients
                    leave during backward unless it is 0)
  fastps wrap+fused fastps.DistributedOptimizer(torch.optim.AdamW(fused=True)):
                    gradients averaged through the servers by the end of
                    backward (pushed during it: its overlap=True default,
                    which FASTPS_OVERLAP does not change), fused AdamW locally
  ddp, AdamW fused  DistributedDataParallel (gloo, all_reduce overlapped with
                    backward) + torch.optim.AdamW(fused=True)

``--clip MAX_NORM`` clips by the norm of the gradients as they are between
backward and step: the global (averaged) gradient for DDP and
DistributedOptimizer; for fastps.optim whatever it holds there (today, with
FASTPS_OVERLAP=0, each rank's local gradient). ``--scaler`` adds
torch.amp.GradScaler("cpu") (the loss, or in step mode the gradients, scaled by
2**16; float32 throughout, so no step is skipped). At the end every system's
parameters are compared with the reference's (fastps's in step mode, DDP's in
backward mode); without edits they must agree (rtol 1e-4), with them the
maximum difference is printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

import fastps
from fastps.bench._common import parse_size

_SCALE = 2.0 ** 16


def _finish(opt: torch.optim.Optimizer, params: List[torch.Tensor], clip: Optional[float],
            scaler: Optional[torch.amp.GradScaler]) -> Optional[float]:
    """What a training loop does between backward and the next zero_grad(); returns the
    gradient norm clip_grad_norm_ saw (None without --clip)."""
    norm = None
    if scaler is not None:
        scaler.unscale_(opt)
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(params, clip).item()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return norm


def _compare(params: Dict[str, List[torch.Tensor]], ref: str, edits: bool) -> List[str]:
    """Each system's parameters against ``ref``'s: asserts agreement without edits, else
    returns lines stating the largest difference."""
    lines = []
    for name, ps in params.items():
        if name == ref:
            continue
        if not edits:
            for p, q in zip(ps, params[ref]):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
            continue
        diff = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
                   for p, q in zip(ps, params[ref]))
        lines.append(f"# {name}: parameters differ from {ref}'s by at most {diff:.1e} relative")
    return lines


def _report(times: Dict[str, List[float]], warmup: int, first: str, header: str, notes: List[str]) -> None:
    med = {k: statistics.median(v[warmup:]) * 1e3 for k, v in times.items()}
    print(header)
    for line in notes:
        print(line)
    for name in times:
        print(f"{name:>20}  {med[name]:8.1f} ms   {med[name] / med[first]:5.2f}x {first}'s time")


def step_mode(args: argparse.Namespace, rank: int, world: int) -> None:
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
    scalers = {name: torch.amp.GradScaler("cpu", init_scale=_SCALE) if args.scaler else None for name in systems}
    times: Dict[str, List[float]] = {name: [] for name in systems}

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
        scaler = scalers[name]
        for p, g in zip(params[name], grads):
            p.grad = scaler.scale(g) if scaler is not None else g.clone()  # as scale(loss).backward()
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
        _finish(opts[name], params[name], args.clip, scaler)
        times[name].append(time.perf_counter() - t)

    names = list(systems)
    for i in range(args.warmup + args.steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            step(name)
    notes = _compare(params, "fastps", args.clip is not None)
    if rank == 0:
        _report(times, args.warmup, "fastps",
                f"# Adam step after backward{_edits(args)}, {args.params / 1e6:.1f}M float32 params in "
                f"{args.tensors} tensors, {world} workers, torch {torch.__version__}, 1 thread per worker, "
                f"FASTPS_OVERLAP={os.environ['FASTPS_OVERLAP']}, medians of {args.steps} steps", notes)


def backward_mode(args: argparse.Namespace, rank: int, world: int) -> None:
    torch.manual_seed(0)  # the same initial model on every rank and in every system
    base = nn.Sequential(*[m for _ in range(args.layers - 1) for m in (nn.Linear(args.width, args.width), nn.ReLU())],
                         nn.Linear(args.width, args.width))
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    data = [(torch.randn(args.batch, args.width, generator=gen), torch.randn(args.batch, args.width, generator=gen))
            for _ in range(4)]

    systems: Dict[str, Callable[[nn.Module], tuple]] = {
        "fastps": lambda m: (m, fastps.optim.AdamW(m.parameters(), lr=1e-3)),
        "fastps wrap+fused": lambda m: (m, fastps.DistributedOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True))),
        "ddp, AdamW fused": lambda m: (nn.parallel.DistributedDataParallel(m),
                                       torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)),
    }
    models = {name: copy.deepcopy(base) for name in systems}
    nets, opts = {}, {}
    for name, make in systems.items():
        nets[name], opts[name] = make(models[name])
    scalers = {name: torch.amp.GradScaler("cpu", init_scale=_SCALE) if args.scaler else None for name in systems}
    times: Dict[str, List[float]] = {name: [] for name in systems}
    norms: Dict[str, List[float]] = {name: [] for name in systems}

    def iteration(name: str, i: int) -> None:
        x, y = data[i % len(data)]
        scaler = scalers[name]
        dist.barrier()
        t = time.perf_counter()
        loss = nn.functional.mse_loss(nets[name](x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        norms[name].append(_finish(opts[name], list(models[name].parameters()), args.clip, scaler))
        opts[name].zero_grad(set_to_none=True)
        times[name].append(time.perf_counter() - t)

    names = list(systems)
    for i in range(args.warmup + args.steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            iteration(name, i)
    ref = "ddp, AdamW fused"
    notes = _compare({n: list(m.parameters()) for n, m in models.items()}, ref,
                     args.clip is not None or args.scaler)
    if args.clip is not None:
        notes += [f"# {name}: gradient norm seen by clip_grad_norm_ {min(v):.3g}..{max(v):.3g} (clips above "
                  f"{args.clip:g})" for name, v in norms.items()]
    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        _report(times, args.warmup, "fastps",
                f"# forward+backward{_edits(args)}+AdamW step, MLP {args.layers}x{args.width} "
                f"({params / 1e6:.1f}M float32 params), batch {args.batch} per worker, {world} workers, "
                f"torch {torch.__version__}, 1 thread per worker, "
                f"FASTPS_OVERLAP={os.environ.get('FASTPS_OVERLAP', '1 (default)')}, medians of {args.steps} steps",
                notes)


def _edits(args: argparse.Namespace) -> str:
    return (" + GradScaler unscale_" if args.scaler else "") + \
        (f" + clip_grad_norm_({args.clip:g})" if args.clip is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["step", "backward"], default="step")
    ap.add_argument("--params", type=parse_size, default=16 << 20, help="step mode: float32 values in all (16M)")
    ap.add_argument("--tensors", type=int, default=8, help="step mode: parameter tensors")
    ap.add_argument("--layers", type=int, default=4, help="backward mode: Linear layers")
    ap.add_argument("--width", type=int, default=2048, help="backward mode: their width")
    ap.add_argument("--batch", type=int, default=8, help="backward mode: rows per worker")
    ap.add_argument("--clip", type=float, default=None, metavar="MAX_NORM", help="clip_grad_norm_ before step")
    ap.add_argument("--scaler", action="store_true", help="torch.amp.GradScaler('cpu')")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if args.mode == "step":
        # all of fastps's work in step(), where DDP's share is timed too
        os.environ.setdefault("FASTPS_OVERLAP", "0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (step_mode if args.mode == "step" else backward_mode)(args, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
