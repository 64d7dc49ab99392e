"""Cases of tests/test_optim_checks.py run in both modes: in the test's own process (the
embedded mode) and by tests/dist_worker.py in each rank of a job (the distributed mode).
Each returns a dict of plain values and tensors for the test to compare."""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

import fastps


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def bad_state() -> dict:
    """Loads the Adam state of nn.Linear(2, 2) into fastps.optim.Adam over nn.Linear(n, n):
    the error, whether the optimizer was left as it was and still trains, its parameters
    after 3 steps (n = 64); then a float64 state dict (cast as torch does) and 2 steps."""
    torch.manual_seed(0)
    small = nn.Linear(2, 2)
    ref = torch.optim.Adam(small.parameters(), lr=0.1)
    small(torch.ones(3, 2)).sum().backward()
    ref.step()
    wrong = ref.state_dict()
    res = {}
    for n in (64, 1024):
        torch.manual_seed(1)
        model = nn.Linear(n, n)
        opt = fastps.optim.Adam(model.parameters(), lr=0.01)
        x = torch.ones(4, n)  # the same batch on every rank: the job trains as one process would
        _train(model, opt, x, torch.zeros(4, n), 1)
        before = copy.deepcopy(opt.state_dict())
        try:
            opt.load_state_dict(wrong)
            res[f"error{n}"] = "accepted"
        except fastps.InvalidArgumentError as e:
            res[f"error{n}"] = str(e)
        after = opt.state_dict()
        res[f"kept{n}"] = all(torch.equal(after["state"][i][k], torch.as_tensor(v))
                              for i, st in before["state"].items() for k, v in st.items())
        _train(model, opt, x, torch.zeros(4, n), 2)
        res[f"finite{n}"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if n == 64:
            res["params64"] = [p.detach().clone() for p in model.parameters()]
    # Another dtype is cast to the parameter's, as torch does.
    torch.manual_seed(2)
    model = nn.Linear(8, 8)
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, ref, torch.ones(4, 8), torch.zeros(4, 8), 2)
    state = ref.state_dict()
    for st in state["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].double()
    opt = fastps.optim.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(state)
    _train(model, opt, torch.ones(4, 8), torch.zeros(4, 8), 2)
    res["cast"] = [p.detach().clone() for p in model.parameters()]
    return res


def shared_storage() -> dict:
    """fastps.optim over overlapping views and over a parameter listed twice (the errors, or
    "accepted"); disjoint views after a step; DistributedOptimizer over both, and over a
    strided view, after a step."""
    res = {}
    base = torch.zeros(6)
    p1, p2 = nn.Parameter(base[0:4]), nn.Parameter(base[2:6])
    q = nn.Parameter(torch.zeros(3))
    attempts = {
        "overlap": lambda: fastps.optim.SGD([p1, p2], lr=1.0),
        "overlap_group": lambda: fastps.optim.SGD([p1], lr=1.0).add_param_group({"params": [p2]}),
        "duplicate": lambda: fastps.optim.Adam([q, q], lr=1.0),
        "duplicate_group": lambda: fastps.optim.Adam([p1], lr=1.0).add_param_group({"params": [q, q]}),
    }
    for key, make in attempts.items():
        try:
            make()
            res[key] = "accepted"
        except fastps.InvalidArgumentError as e:
            res[key] = str(e)
    # Views that do not overlap are separate parameters: accepted, updated as torch does.
    flat = torch.zeros(6)
    a, b = nn.Parameter(flat[:3]), nn.Parameter(flat[3:])
    opt = fastps.optim.SGD([a, b], lr=1.0)
    a.grad, b.grad = torch.full((3,), 5.0), torch.full((3,), 6.0)
    opt.step()
    res["disjoint"] = flat.clone()
    # DistributedOptimizer steps the wrapped torch optimizer locally: torch's semantics.
    base = torch.zeros(6)
    c, d = nn.Parameter(base[0:4]), nn.Parameter(base[2:6])
    wrapped = fastps.DistributedOptimizer(torch.optim.SGD([c, d], lr=1.0))
    c.grad, d.grad = torch.full((4,), 5.0), torch.full((4,), 6.0)
    wrapped.step()
    res["wrap_overlap"] = base.clone()
    e = nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own duplicate warning
        wrapped = fastps.DistributedOptimizer(torch.optim.SGD([e, e], lr=1.0))
    e.grad = torch.ones(3)
    wrapped.step()
    res["wrap_duplicate"] = e.detach().clone()
    # A strided view as a parameter: every rank starts from rank 0's values (they were
    # copied in storage order, numel floats from its first element: other elements).
    base = torch.arange(8.0) + 100 * int(os.environ.get("RANK", "0"))
    s = nn.Parameter(base[::2])
    wrapped = fastps.DistributedOptimizer(torch.optim.SGD([s], lr=1.0))
    s.grad = torch.ones(4)
    wrapped.step()
    res["wrap_strided"] = base.clone()
    return res
