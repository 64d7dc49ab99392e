"""The training loop of the gradient-edit tests (tests/test_grad_edits.py), shared by the
2-rank workers (tests/dist_worker.py "edits") and the single-process reference.

What an LLM script does between backward and step(): GradScaler, unscale_, clipping by
the global norm, a hand-set lr per step, gradient accumulation, other edits."""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch import nn

STEPS = 6
OPTIONS = {
    # scaler + explicit unscale_ + clip_grad_norm_, an inf on rank 1 at step 2, accumulation
    # over 2 micro-steps with no_sync() on the first, zero_grad(set_to_none=False)
    "scaler": dict(scaler=True, unscale=True, clip="norm", inf_at=2, accum=2, no_sync=True, set_to_none=False),
    # clip by norm, then a non-uniform edit (a mask), accumulation without no_sync()
    "mask": dict(scaler=False, unscale=False, clip="norm", mask=True, accum=2, no_sync=False, set_to_none=True),
    # scaler.step() without unscale_, clip_grad_value_ (an edit that is not a scale)
    "value": dict(scaler=True, unscale=False, clip="value", accum=1, no_sync=False, set_to_none=True),
}


def model_and_data():
    torch.manual_seed(100)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, 8, generator=g)  # 4 micro-batches of 32 rows (two halves of 16)
    y = torch.randn(4, 32, 1, generator=g)
    return model, x, y


def run(model, opt, x, y, option: str, *, rank: int, world: int, no_sync=None) -> Dict[str, List[float]]:
    """world == 1: the reference on the whole batch; else this rank's half of it."""
    o = OPTIONS[option]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2) if o["scaler"] else None
    log: Dict[str, List[float]] = {"loss": [], "norm": [], "scale": []}
    halves = range(2) if world == 1 else [rank]
    base_lr = [g["lr"] for g in opt.param_groups]
    for step in range(STEPS):
        for micro in range(o["accum"]):
            ctx = no_sync() if (no_sync is not None and o["no_sync"] and micro < o["accum"] - 1) else contextlib.nullcontext()
            with ctx:
                xb, yb = x[(step + micro) % 4], y[(step + micro) % 4]
                loss = 0.0
                for h in halves:
                    part = nn.functional.mse_loss(model(xb[16 * h:16 * h + 16]), yb[16 * h:16 * h + 16])
                    if step == o.get("inf_at") and h == 1:
                        part = part * float("inf")  # one rank's backward produces infs
                    loss = loss + part
                loss = loss / len(halves) / o["accum"]  # the mean over halves; over ranks fastps averages
                (scaler.scale(loss) if scaler else loss).backward()
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * (1.0 + 0.25 * step)  # an lr set by hand every step
        if scaler and o["unscale"]:
            scaler.unscale_(opt)
        if o["clip"] == "norm":
            log["norm"].append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        elif o["clip"] == "value":
            nn.utils.clip_grad_value_(model.parameters(), 1e-3 * (scaler.get_scale() if scaler else 1.0))
        if o.get("mask"):
            for p in model.parameters():
                p.grad.view(-1)[::3] = 0.0
        if scaler:
            scaler.step(opt)
            scaler.update()
            log["scale"].append(scaler.get_scale())
        else:
            opt.step()
        opt.zero_grad(set_to_none=o["set_to_none"])
        log["loss"].append(float(loss.detach()))  # this rank's own (not compared)
    return log
