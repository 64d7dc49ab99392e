"""Worker of tests/test_distributed_optimizer.py (started by tests/_launch.py with worker=).

    dist_optimizer_worker.py SYSTEM STEPS OUT

The training loop of a mixed-precision script: two micro-batches per step (the
first under ``no_sync()``), ``GradScaler("cpu")`` (``unscale_`` then
``clip_grad_norm_`` then ``scaler.step``; every third step ``scaler.step``
alone, which unscales itself), a LambdaLR scheduler (warmup and decay), and
on step ``INF_STEP`` rank 1's loss times inf, which must skip the step and
back the scale off on every rank. SYSTEM:

    ddp            DistributedDataParallel (gloo) + torch.optim.AdamW: the reference
    fastps         fastps.DistributedOptimizer(torch.optim.AdamW), default settings
    fastps-sync    the same with overlap=False and an explicit synchronize() after
                   backward (the API before backward averaged by itself)
    fastps-ddp     the model kept in DistributedDataParallel and
                   fastps.DistributedOptimizer(torch.optim.AdamW): DDP averages, fastps
                   must send nothing (Note [DistributedOptimizer under DDP])

Saves (torch.save) to OUT.RANK: the parameters, and per step the local loss,
the norm clip_grad_norm_ returned, the scale after update() and the lr; for
the fastps systems also the bytes this rank's client sent while training.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn

import fastps

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
INF_STEP = 3
MAX_NORM = 0.05


def main() -> int:
    system, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ddp = system in ("ddp", "fastps-ddp")  # the model is wrapped in DDP
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    # fastps starts every rank from rank 0's parameters; DDP from its broadcast.
    torch.manual_seed(100 + (0 if ddp else RANK))
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    if system == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
        opt = inner
    elif system == "fastps-ddp":
        net = nn.parallel.DistributedDataParallel(model)
        opt = fastps.DistributedOptimizer(inner)
    else:
        net = model
        opt = fastps.DistributedOptimizer(inner, overlap=system != "fastps-sync")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    gen = torch.Generator().manual_seed(7)
    rec = {"loss": [], "norm": [], "scale": [], "lr": []}
    client = opt._sender.client if isinstance(opt, fastps.DistributedOptimizer) else None
    sent_before = client.stats()["bytes_sent"] if client is not None else 0
    for step in range(steps):
        x = torch.randn(2, 32, 8, generator=gen)  # two micro-batches of the global batch
        y = torch.randn(2, 32, 1, generator=gen)
        for micro in range(2):
            quiet = (net.no_sync() if ddp else opt.no_sync()) if micro == 0 else contextlib.nullcontext()
            with quiet:
                xs, ys = x[micro].chunk(WORLD)[RANK], y[micro].chunk(WORLD)[RANK]
                loss = nn.functional.mse_loss(net(xs), ys) / 2
                if step == INF_STEP and RANK == 1 and micro == 1:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
        if system == "fastps-sync":
            opt.synchronize()
        if step % 3 != 2:
            scaler.unscale_(opt)
            norm = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        else:
            norm = torch.tensor(float("nan"))  # scaler.step unscales; nothing to clip
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        rec["loss"].append(loss.item())
        rec["norm"].append(norm.item())
        rec["scale"].append(scaler.get_scale())
        rec["lr"].append(opt.param_groups[0]["lr"])
    rec["params"] = [p.detach() for p in model.parameters()]
    rec["bytes_sent"] = client.stats()["bytes_sent"] - sent_before if client is not None else 0
    rec["isinstance"] = isinstance(opt, torch.optim.Optimizer)
    torch.save(rec, f"{out}.{RANK}")
    if ddp:
        dist.destroy_process_group()
    if system == "ddp":
        _leave_reference_run()
    return 0


def _leave_reference_run() -> None:
    """The torch-only reference run ends here, its results saved: under load torch's gloo
    threads now and then abort the interpreter's finalization ("terminate called without
    an active exception"), which says nothing about the run being compared with."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
