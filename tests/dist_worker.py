"""Worker program of the multi-process tests (started by tests/_launch.py).

    dist_worker.py train OPT STEPS OUT     fastps.optim.OPT on this rank's half of a fixed batch (and a
                                           parameter without gradients, which must stay as it was)
    dist_worker.py wrap OPT STEPS OUT      fastps.DistributedOptimizer(torch.optim.OPT)
    dist_worker.py ddp OPT STEPS OUT       torch DDP (gloo) reference
    dist_worker.py slow OUT                trains until an error; records the error and its delay
    dist_worker.py die_between OUT         as slow, but rank 1 exits between backward and step() at step 8
    dist_worker.py resume OPT STEPS OUT    train STEPS, checkpoint, reload into fresh objects, train STEPS
    dist_worker.py emb STEPS OUT           fastps.nn.Embedding + Linear under fastps.optim.Adam; then
                                           state_dict, 2 more steps, reload, the same 2 steps again
    dist_worker.py emb_slow OUT            trains an embedding until an error; records it and its delay
    dist_worker.py clip OUT                clip_grad_norm_ between backward and step(); records "ok" or
                                           the error fastps.optim raised
    dist_worker.py wrap_clip SYNC STEPS OUT  DistributedOptimizer(SGD), clip_grad_norm_ after backward,
                                           after opt.synchronize() if SYNC is "sync"; params or the error
    dist_worker.py edits OPTION OUT [ddp]  tests/_edits.py's loop with fastps.optim.AdamW: GradScaler, clipping,
                                           accumulation, lr per step; its log and parameters (ddp: the
                                           model kept in DistributedDataParallel)
    dist_worker.py edges OUT               add_param_group after 3 steps of fastps.optim.SGD, then 3 more;
                                           a non-contiguous parameter; DistributedOptimizer(AdamW) with a
                                           frozen parameter
    dist_worker.py bad_state OUT           _optim_cases.bad_state(): a state dict of another model's shape
    dist_worker.py shared OUT              _optim_cases.shared_storage(): parameters that share memory
    dist_worker.py nap SECONDS OUT         6 steps of fastps.optim.SGD; after step 2 rank 1 sleeps SECONDS,
                                           then computes in Python (GIL held) for SECONDS; writes "ok"
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import fastps

import _optim_cases

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def model_and_data(seed_by_rank: bool = True):
    # Different initial parameters per rank: fastps must start everyone from rank 0's.
    torch.manual_seed(100 + (RANK if seed_by_rank else 0))
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 1, generator=g)
    return model, x.chunk(WORLD)[RANK], y.chunk(WORLD)[RANK]


def make_opt(name: str, params, fast: bool):
    kw = {"SGD": dict(lr=0.05, momentum=0.9), "Adam": dict(lr=0.01), "AdamW": dict(lr=0.01),
          "Adagrad": dict(lr=0.05)}[name]
    return getattr(fastps.optim if fast else torch.optim, name)(params, **kw)


def train_loop(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


EMB_IDS = 40  # ids 0..39; the halves' batches share some ids


def emb_model_and_data():
    torch.manual_seed(100 + RANK)  # dense layers: fastps starts every rank from rank 0's
    emb = fastps.nn.Embedding(8, seed=3)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8 * 3, 1))
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, EMB_IDS, (32, 3), generator=g)
    y = torch.randn(32, 1, generator=g)
    return emb, model, x.chunk(WORLD)[RANK], y.chunk(WORLD)[RANK]


def train_until_failure(model, x, y, out, after_step=None, after_backward=None) -> int:
    """Train with SGD until fastps raises (the test kills a server): writes `out.ready.RANK`
    after step 5, then the error's type, the seconds since the last good step and its
    message to `out.RANK`, and leaves with status 3."""
    opt = fastps.optim.SGD(model.parameters(), lr=0.01)
    last_ok = time.monotonic()
    try:
        for step in range(100000):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
            if after_step is not None:
                after_step()
            last_ok = time.monotonic()
            if step == 5:
                with open(f"{out}.ready.{RANK}", "w") as f:
                    f.write("ok")
            time.sleep(0.02)
    except fastps.FastPSError as e:
        with open(f"{out}.{RANK}", "w") as f:
            f.write(f"{type(e).__name__}\n{time.monotonic() - last_ok:.3f}\n{e}\n")
        os._exit(3)  # skip the shutdown barrier: the job is broken
    return 0


def main() -> int:
    mode = sys.argv[1]
    if mode == "train":
        name, steps, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        model, x, y = model_and_data()
        # Never used in forward: its gradient stays None, so every step pushes a "skip"
        # (an optimizer config block and no values) and the parameter must not change.
        unused = nn.Parameter(torch.full((3000,), 0.5))
        opt = make_opt(name, list(model.parameters()) + [unused], fast=True)
        losses = train_loop(model, opt, x, y, steps)
        from fastps import _cluster
        paths = _cluster._cluster.client.server_paths()  # how this worker reached each server
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses, "paths": paths,
                    "unused": unused.detach()}, f"{out}.{RANK}")
    elif mode == "wrap":
        name, steps, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        model, x, y = model_and_data()
        opt = fastps.DistributedOptimizer(make_opt(name, model.parameters(), fast=False))
        losses = train_loop(model, opt, x, y, steps)
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses}, f"{out}.{RANK}")
    elif mode == "ddp":
        import torch.distributed as dist
        name, steps, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        dist.init_process_group("gloo")
        model, x, y = model_and_data(seed_by_rank=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_opt(name, ddp.parameters(), fast=False)
        losses = train_loop(ddp, opt, x, y, steps)
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses}, f"{out}.{RANK}")
        dist.destroy_process_group()
        # The torch-only reference ends here, its results saved: under load torch's gloo
        # threads now and then abort the interpreter's finalization ("terminate called
        # without an active exception"), which says nothing about the run compared with it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    elif mode == "slow":
        model, x, y = model_and_data()
        return train_until_failure(model, x, y, sys.argv[2])
    elif mode == "nap":
        seconds, out = float(sys.argv[2]), sys.argv[3]
        model, x, y = model_and_data()
        opt = make_opt("SGD", model.parameters(), fast=True)
        for step in range(6):
            train_loop(model, opt, x, y, 1)
            if step == 2 and RANK == 1:
                time.sleep(seconds)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    sum(range(1000))
        with open(f"{out}.{RANK}", "w") as f:
            f.write("ok")
    elif mode == "resume":
        name, steps, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        model, x, y = model_and_data()
        opt = make_opt(name, model.parameters(), fast=True)
        train_loop(model, opt, x, y, steps)
        ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
        after = train_loop(model, opt, x, y, steps)
        # A second optimizer over fresh modules, loaded from the checkpoint, must continue identically.
        model2, _, _ = model_and_data()
        opt2 = make_opt(name, model2.parameters(), fast=True)
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        again = train_loop(model2, opt2, x, y, steps)
        torch.save({"after": after, "again": again}, f"{out}.{RANK}")
    elif mode == "emb":
        import copy
        steps, out = int(sys.argv[2]), sys.argv[3]
        emb, model, x, y = emb_model_and_data()
        opt = fastps.optim.Adam(model.parameters(), lr=0.05)
        losses = train_loop(model, opt, x, y, steps)
        all_ids = torch.arange(EMB_IDS)
        rows = emb.lookup(all_ids)
        num_rows, step_count = emb.num_rows, emb.step_count
        sd = copy.deepcopy(model.state_dict())
        osd = copy.deepcopy(opt.state_dict())
        if RANK == 0:
            torch.save(sd, f"{out}.sd")
        train_loop(model, opt, x, y, 2)
        rows_a = emb.lookup(all_ids)
        # Nobody may still read the rows when a rank replaces them (docs/sparse.md).
        fastps._cluster.cluster().barrier("test-emb-reload", "every rank before the reload")
        model.load_state_dict(sd)
        opt.load_state_dict(osd)
        rows_loaded = emb.lookup(all_ids)
        train_loop(model, opt, x, y, 2)
        rows_b = emb.lookup(all_ids)
        torch.save({"rows": rows, "dense": [p.detach().clone() for p in model[2].parameters()],
                    "losses": losses, "num_rows": num_rows, "step": step_count,
                    "rows_loaded": rows_loaded, "rows_a": rows_a, "rows_b": rows_b}, f"{out}.{RANK}")
    elif mode == "clip":
        model, x, y = model_and_data()
        opt = fastps.optim.SGD(model.parameters(), lr=0.01)
        try:
            for _ in range(2):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                opt.step()
            result = "ok"
        except fastps.FastPSError as e:
            result = f"{type(e).__name__}: {e}"
        with open(f"{sys.argv[2]}.{RANK}", "w") as f:
            f.write(result)
    elif mode == "wrap_clip":
        sync, steps, out = sys.argv[2] == "sync", int(sys.argv[3]), sys.argv[4]
        model, x, y = model_and_data()
        opt = fastps.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05))
        try:
            for _ in range(steps):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                if sync:
                    opt.synchronize()
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
            result = {"params": [p.detach() for p in model.parameters()]}
        except fastps.FastPSError as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        torch.save(result, f"{out}.{RANK}")
    elif mode == "die_between":  # rank 1 dies between backward and step() at step 8
        model, x, y = model_and_data()

        def die(step):
            if RANK == 1 and step == 8:
                os._exit(9)
        return train_until_failure(model, x, y, sys.argv[2], after_backward=die)
    elif mode == "emb_slow":
        emb, model, x, y = emb_model_and_data()
        # A pull after every step: waits for the step's round.
        return train_until_failure(model, x, y, sys.argv[2], after_step=lambda: emb.lookup(torch.tensor([1])))
    elif mode == "edits":
        import _edits
        option, out = sys.argv[2], sys.argv[3]
        model, x, y = _edits.model_and_data()
        if len(sys.argv) > 4 and sys.argv[4] == "ddp":  # the model kept in DDP: its no_sync()
            import torch.distributed as dist
            dist.init_process_group("gloo")
            wrapped = nn.parallel.DistributedDataParallel(model)
            opt = fastps.optim.AdamW(wrapped.parameters(), lr=0.01, weight_decay=0.1)
            log = _edits.run(wrapped, opt, x, y, option, rank=RANK, world=WORLD, no_sync=wrapped.no_sync)
        else:
            opt = fastps.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
            log = _edits.run(model, opt, x, y, option, rank=RANK, world=WORLD, no_sync=opt.no_sync)
        torch.save({"log": log, "params": [p.detach() for p in model.parameters()],
                    "ddp_seen": bool(opt._fastps_dist.ddp)}, f"{out}.{RANK}")
    elif mode == "edges":
        out = sys.argv[2]
        model, x, y = model_and_data(seed_by_rank=False)  # the late group's layers start alike everywhere
        first = list(model[0].parameters())
        opt = fastps.optim.SGD(first, lr=0.05)
        train_loop(model, opt, x, y, 3)
        opt.add_param_group({"params": [p for p in model.parameters() if all(p is not q for q in first)]})
        train_loop(model, opt, x, y, 3)  # the new group's rounds count from its registration
        try:
            fastps.optim.SGD([nn.Parameter(torch.randn(4, 3).t())], lr=0.1)
            contiguity = "accepted"
        except TypeError as e:
            contiguity = str(e)
        frozen_model, _, _ = model_and_data()
        frozen_model[0].requires_grad_(False)
        before = frozen_model[0].weight.detach().clone()
        wrapped = fastps.DistributedOptimizer(torch.optim.AdamW(frozen_model.parameters(), lr=0.01,
                                                                weight_decay=0.5))
        train_loop(frozen_model, wrapped, x, y, 2)
        torch.save({"params": [p.detach() for p in model.parameters()], "contiguity": contiguity,
                    "frozen_kept": bool(torch.equal(frozen_model[0].weight.detach(), before))}, f"{out}.{RANK}")
    elif mode == "bad_state":
        torch.save(_optim_cases.bad_state(), f"{sys.argv[2]}.{RANK}")
    elif mode == "shared":
        torch.save(_optim_cases.shared_storage(), f"{sys.argv[2]}.{RANK}")
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
