"""fastps.DistributedOptimizer as a torch.optim.Optimizer: schedulers, GradScaler, state
dicts and hooks in one process (a pass-through there), and the mixed-precision training
loop under two ranks against DistributedDataParallel + the same torch optimizer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import fastps

from _launch import Job, check

WORKER = str(Path(__file__).with_name("dist_optimizer_worker.py"))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def _train(model, opt, steps: int, *, inf_step: int = -1):
    """A GradScaler + clip + scheduler loop; returns the scales after each update()."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    gen = torch.Generator().manual_seed(3)
    scales = []
    for step in range(steps):
        loss = model(torch.randn(8, 6, generator=gen)).pow(2).mean()
        if step == inf_step:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if step % 2:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)  # unscales itself on even steps
        scaler.update()
        sched.step()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales


def test_is_an_optimizer_sharing_the_wrapped_ones_groups_and_state():
    inner = torch.optim.AdamW(_model().parameters(), lr=0.1)
    opt = fastps.DistributedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    # torch's load_state_dict replaces the wrapped optimizer's group list and state:
    # the wrapper reads the new ones.
    opt.load_state_dict(inner.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="already a DistributedOptimizer"):
        fastps.DistributedOptimizer(opt)


def test_scheduler_and_grad_scaler_take_it_and_train_as_the_wrapped_optimizer():
    """Bitwise the same as the bare torch optimizer, including a step skipped for an
    inf and the scale's backoff; a scheduler stepped after it does not warn (warnings
    are errors here), so it saw the wrapper's step()."""
    a, b = _model(), _model()
    plain = torch.optim.AdamW(a.parameters(), lr=0.05)
    wrapped = fastps.DistributedOptimizer(torch.optim.AdamW(b.parameters(), lr=0.05))
    scales_a = _train(a, plain, 8, inf_step=3)
    scales_b = _train(b, wrapped, 8, inf_step=3)
    assert scales_a == scales_b and scales_b[3] == scales_b[2] / 2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert wrapped.param_groups[0]["lr"] == plain.param_groups[0]["lr"]


def test_state_dicts_are_interchangeable_with_the_wrapped_optimizers():
    a = _model()
    wrapped = fastps.DistributedOptimizer(torch.optim.AdamW(a.parameters(), lr=0.05))
    _train(a, wrapped, 3)
    sd, inner = wrapped.state_dict(), wrapped.optimizer.state_dict()
    assert sd["param_groups"] == inner["param_groups"] and sd["state"].keys() == inner["state"].keys()
    for k, v in sd["state"].items():
        assert v.keys() == inner["state"][k].keys() and all(torch.equal(v[n], inner["state"][k][n]) for n in v)
    # Into a bare torch optimizer and back into a new wrapper: both continue alike.
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    plain = torch.optim.AdamW(b.parameters(), lr=0.05)
    plain.load_state_dict(copy.deepcopy(sd))
    again = fastps.DistributedOptimizer(torch.optim.AdamW(c.parameters(), lr=0.05))
    again.load_state_dict(plain.state_dict())
    _train(a, wrapped, 3)
    _train(b, plain, 3)
    _train(c, again, 3)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_step_and_state_dict_hooks_run_once():
    model = _model()
    opt = fastps.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("state_dict", o is opt.optimizer)))
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    opt.state_dict()
    assert calls == [("pre", True), ("post", True), ("state_dict", True)]


def _run(tmp_path: Path, system: str, steps: int):
    out = tmp_path / system
    with Job(2, [system, str(steps), str(out)], worker=WORKER) as job:
        check(job.wait())
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


STEPS = 8


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ddp"), "ddp", STEPS)


@pytest.mark.parametrize("system", ["fastps", "fastps-ddp", pytest.param("fastps-sync", marks=pytest.mark.slow)])
def test_two_ranks_match_ddp_with_clipping_grad_scaler_scheduler_and_accumulation(tmp_path, ddp_run, system):
    """Backward leaves each rank's .grad holding the mean, as DDP does: clip_grad_norm_
    clips by the global norm, GradScaler's inf check agrees across ranks (an inf on rank
    1 skips the step everywhere and backs the scale off alike), no_sync() accumulates,
    and a scheduler drives the lr. Parameters equal DDP's to float32 rounding (world 2:
    DDP's g0/2 + g1/2 and fastps's (g0 + g1)/2 round alike, so in practice bitwise)."""
    ours, ddp = _run(tmp_path, system, STEPS), ddp_run
    inf_step = 3  # dist_optimizer_worker.INF_STEP
    for r in range(2):
        assert ours[r]["isinstance"]
        assert ours[r]["scale"] == ddp[r]["scale"]
        assert ours[r]["lr"] == ddp[r]["lr"]
        for p, q in zip(ours[r]["params"], ddp[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(ours[r]["loss"]), torch.tensor(ddp[r]["loss"]),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
        # the global norm (DDP's), clipped (max 0.05): not each rank's local one
        torch.testing.assert_close(torch.tensor(ours[r]["norm"]), torch.tensor(ddp[0]["norm"]),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    assert ddp[0]["scale"][inf_step] == ddp[0]["scale"][inf_step - 1] / 2  # the inf step was skipped
    if system == "fastps-ddp":  # DDP averaged: fastps sent nothing while training
        assert [ours[r]["bytes_sent"] for r in range(2)] == [0, 0]
    else:
        assert all(ours[r]["bytes_sent"] > 0 for r in range(2))
    for p, q in zip(ours[0]["params"], ours[1]["params"]):
        assert torch.equal(p, q)  # every rank holds the same parameters
