"""The ``torch.optim`` contract, checked on every ``fastps.optim`` optimizer.

Plain pytest versions of the API checks PyTorch runs on its own optimizers
(``test/optim/test_optim.py`` and ``OptimizerInfo``): direction of descent,
no-op without gradients, state_dict determinism and interchangeability with
``torch.optim``, copying, hooks, LR schedulers, GradScaler and input
validation. Numerical parity on many random steps lives in
``test_optim_parity.py``; here the models are tiny and runs are short.

Tolerances: SGD must match ``torch.optim.SGD`` bit for bit; Adam, AdamW and
Adagrad are compared with ``rtol=1e-5, atol=1e-6`` because torch's sqrt is not
always correctly rounded, so a few 1-ulp differences per step are expected.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Dict, Iterable, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastps

FAST = {
    "SGD": fastps.optim.SGD,
    "Adam": fastps.optim.Adam,
    "AdamW": fastps.optim.AdamW,
    "Adagrad": fastps.optim.Adagrad,
}
TORCH = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "Adagrad": torch.optim.Adagrad,
}

# A few hyperparameter settings per optimizer, covering every option's branch.
CONFIGS = [
    pytest.param("SGD", dict(lr=0.1), id="SGD-plain"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="SGD-momentum"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), id="SGD-nesterov-wd"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.5, dampening=0.1, weight_decay=0.1, maximize=True),
                 id="SGD-dampening-maximize"),
    pytest.param("Adam", dict(lr=0.05), id="Adam-plain"),
    pytest.param("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01), id="Adam-amsgrad-wd"),
    pytest.param("Adam", dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, maximize=True), id="Adam-betas-maximize"),
    pytest.param("Adam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True), id="Adam-decoupled"),
    pytest.param("AdamW", dict(lr=0.05), id="AdamW-plain"),
    pytest.param("AdamW", dict(lr=0.05, amsgrad=True, weight_decay=0.1), id="AdamW-amsgrad-wd"),
    pytest.param("AdamW", dict(lr=0.05, maximize=True), id="AdamW-maximize"),
    pytest.param("Adagrad", dict(lr=0.1), id="Adagrad-plain"),
    pytest.param("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1), id="Adagrad-decay-init"),
    pytest.param("Adagrad", dict(lr=0.1, weight_decay=0.01, eps=1e-6, maximize=True), id="Adagrad-wd-maximize"),
]

# One representative setting per optimizer, for checks that do not depend on options.
ONE_EACH = [
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="SGD"),
    pytest.param("Adam", dict(lr=0.05, amsgrad=True), id="Adam"),
    pytest.param("AdamW", dict(lr=0.05, weight_decay=0.1), id="AdamW"),
    pytest.param("Adagrad", dict(lr=0.1, lr_decay=0.05), id="Adagrad"),
]

_GEN = torch.Generator().manual_seed(1234)
_X = torch.randn(16, 8, 5, generator=_GEN)
_Y = torch.randn(16, 8, 2, generator=_GEN)


# -- helpers -------------------------------------------------------------------------


def _tol(name: str) -> Dict[str, float]:
    return dict(rtol=0.0, atol=0.0) if name == "SGD" else dict(rtol=1e-5, atol=1e-6)


def _sign(kw: Dict[str, Any]) -> float:
    """Objective sign: a maximizing optimizer gets the negated loss, so it still descends."""
    return -1.0 if kw.get("maximize", False) else 1.0


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(model: nn.Module, i: int, sign: float = 1.0) -> torch.Tensor:
    b = i % _X.shape[0]
    return sign * F.mse_loss(model(_X[b]), _Y[b])


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, start: int = 0, sign: float = 1.0,
           after_step: Optional[Callable[[int], None]] = None) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i, sign).backward()
        opt.step()
        if after_step is not None:
            after_step(i)


def _pair(name: str, kw: Dict[str, Any]):
    """A fastps model+optimizer and an identical torch one."""
    mf = _model()
    mt = copy.deepcopy(mf)
    return mf, FAST[name](mf.parameters(), **kw), mt, TORCH[name](mt.parameters(), **kw)


def _snapshot(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (distinguishes -0.0 from 0.0 and compares NaN payloads)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).view(torch.int32), b.detach().reshape(-1).view(torch.int32))


def _assert_params_close(name: str, a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **_tol(name))


def _assert_params_equal(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x, y)


def _hyperparameters(opt: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _state_list(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> List[Dict[str, Any]]:
    return [dict(opt.state[p]) if p in opt.state else {} for p in params]


def _assert_state_close(name: str, sa: List[Dict[str, Any]], sb: List[Dict[str, Any]], *,
                        exact: bool = False) -> None:
    assert len(sa) == len(sb)
    for a, b in zip(sa, sb):
        assert set(a) == set(b)
        for k in a:
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], **_tol(name))


# -- 1. direction of descent ---------------------------------------------------------


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("name,kw", CONFIGS)
def test_goes_right_direction(name, kw, maximize):
    # A convex problem: linear least squares. With maximize=True the optimizer is
    # handed the negated objective, so the loss must still go down.
    kw = dict(kw, maximize=maximize)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.25
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = FAST[name](model.parameters(), **kw)
    sign = -1.0 if maximize else 1.0
    with torch.no_grad():
        before = F.mse_loss(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        (sign * F.mse_loss(model(x), y)).backward()
        opt.step()
    with torch.no_grad():
        after = F.mse_loss(model(x), y).item()
    assert after < 0.9 * before, (before, after)


# -- 2. a group with a vanishing lr ------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_tiny_lr_group_unchanged(name, kw):
    model = _model()
    opt = FAST[name]([
        {"params": model[0].parameters(), "lr": 1e-28},
        {"params": model[2].parameters()},
    ], **kw)
    frozen = _snapshot(model[0].parameters())
    moving = _snapshot(model[2].parameters())
    _train(model, opt, 3, sign=_sign(kw))
    for before, p in zip(frozen, model[0].parameters()):
        assert _bits_equal(before, p)
    assert any(not torch.equal(before, p) for before, p in zip(moving, model[2].parameters()))


# -- 3. no-op without gradients ------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_noop_without_grads(name, kw):
    mf, of, mt, ot = _pair(name, kw)
    before = _snapshot(mf.parameters())
    of.step()
    ot.step()
    for b, p in zip(before, mf.parameters()):
        assert p.grad is None
        assert _bits_equal(b, p)
    # No state created beyond what torch creates (Adagrad creates it eagerly).
    for sf, st in zip(_state_list(of, mf.parameters()), _state_list(ot, mt.parameters())):
        assert set(sf) == set(st)
        for k in sf:
            assert torch.equal(sf[k], st[k]), k

    # After training, a step with every grad set to None leaves params and state bit-for-bit.
    _train(mf, of, 2, sign=_sign(kw))
    of.zero_grad(set_to_none=True)
    params = _snapshot(mf.parameters())
    state = copy.deepcopy(_state_list(of, mf.parameters()))
    of.step()
    for b, p in zip(params, mf.parameters()):
        assert _bits_equal(b, p)
    for s0, s1 in zip(state, _state_list(of, mf.parameters())):
        assert set(s0) == set(s1)
        for k in s0:
            assert _bits_equal(s0[k], s1[k]), k


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(5, 2)
        self.unused = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_noop_for_params_without_grads_in_partial_model(name, kw):
    torch.manual_seed(0)
    mf = _TwoHeads()
    mt = copy.deepcopy(mf)
    of = FAST[name](mf.parameters(), **kw)
    ot = TORCH[name](mt.parameters(), **kw)
    unused = _snapshot(mf.unused.parameters())
    used = _snapshot(mf.used.parameters())
    for m, o in ((mf, of), (mt, ot)):
        _train(m, o, 3, sign=_sign(kw))
    for b, p in zip(unused, mf.unused.parameters()):
        assert p.grad is None
        assert _bits_equal(b, p)
    assert any(not torch.equal(b, p) for b, p in zip(used, mf.used.parameters()))
    _assert_params_close(name, mf.parameters(), mt.parameters())
    _assert_state_close(name, _state_list(of, mf.parameters()), _state_list(ot, mt.parameters()))


# -- 4. deterministic state_dict reload ------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_state_dict_reload_is_deterministic(name, kw):
    sign = _sign(kw)
    model = _model()
    opt = FAST[name](model.parameters(), **kw)
    _train(model, opt, 5, sign=sign)
    model_sd = copy.deepcopy(model.state_dict())
    opt_sd = copy.deepcopy(opt.state_dict())
    _train(model, opt, 10, start=5, sign=sign)

    model2 = _model(seed=1)  # different init: everything must come from the state dicts
    model2.load_state_dict(model_sd)
    opt2 = FAST[name](model2.parameters(), **kw)
    opt2.load_state_dict(opt_sd)
    _train(model2, opt2, 10, start=5, sign=sign)
    _assert_params_equal(model.parameters(), model2.parameters())
    _assert_state_close(name, _state_list(opt, model.parameters()), _state_list(opt2, model2.parameters()),
                        exact=True)


# -- 5. state contents and interchangeability with torch.optim --------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_state_after_one_step_matches_torch(name, kw):
    mf, of, mt, ot = _pair(name, kw)
    sign = _sign(kw)
    _train(mf, of, 1, sign=sign)
    _train(mt, ot, 1, sign=sign)
    if name != "SGD" or kw.get("momentum", 0) != 0:
        assert len(of.state) > 0
        assert all(len(of.state[p]) > 0 for p in mf.parameters())
    sf, st = _state_list(of, mf.parameters()), _state_list(ot, mt.parameters())
    for a, b in zip(sf, st):
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    _assert_state_close(name, sf, st)
    # The state dicts have the same layout: same groups, same hyperparameters.
    sdf, sdt = of.state_dict(), ot.state_dict()
    assert sdf["param_groups"] == sdt["param_groups"]
    # fastps.optim.SGD without momentum leaves empty entries where torch leaves none.
    assert sorted(k for k, v in sdf["state"].items() if v) == sorted(k for k, v in sdt["state"].items() if v)


@pytest.mark.parametrize("direction", ["fastps_to_torch", "torch_to_fastps"])
@pytest.mark.parametrize("name,kw", CONFIGS)
def test_state_dict_interchangeable_with_torch(name, kw, direction):
    src_cls, dst_cls = (FAST[name], TORCH[name]) if direction == "fastps_to_torch" else (TORCH[name], FAST[name])
    sign = _sign(kw)
    src_model = _model()
    src = src_cls(src_model.parameters(), **kw)
    _train(src_model, src, 3, sign=sign)

    dst_model = _model(seed=1)
    dst_model.load_state_dict(src_model.state_dict())
    dst = dst_cls(dst_model.parameters(), **kw)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    _assert_state_close(name, _state_list(src, src_model.parameters()), _state_list(dst, dst_model.parameters()),
                        exact=True)

    # One more step of each from identical gradients.
    for p, q in zip(src_model.parameters(), dst_model.parameters()):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        p.grad = g.clone()
        q.grad = g.clone()
    src.step()
    dst.step()
    _assert_params_close(name, src_model.parameters(), dst_model.parameters())
    _assert_state_close(name, _state_list(src, src_model.parameters()), _state_list(dst, dst_model.parameters()))

    # And training continues the same way.
    _train(src_model, src, 3, start=3, sign=sign)
    _train(dst_model, dst, 3, start=3, sign=sign)
    _assert_params_close(name, src_model.parameters(), dst_model.parameters())


# -- 6. torch.save / torch.load(weights_only=True) --------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_state_dict_survives_save_load(name, kw, tmp_path):
    sign = _sign(kw)
    model = _model()
    opt = FAST[name](model.parameters(), **kw)
    _train(model, opt, 5, sign=sign)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    _train(model, opt, 5, start=5, sign=sign)

    ckpt = torch.load(path, weights_only=True)
    model2 = _model(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = FAST[name](model2.parameters(), **kw)
    opt2.load_state_dict(ckpt["optim"])
    _train(model2, opt2, 5, start=5, sign=sign)
    _assert_params_equal(model.parameters(), model2.parameters())
    _assert_state_close(name, _state_list(opt, model.parameters()), _state_list(opt2, model2.parameters()),
                        exact=True)


# -- 7. repr and deepcopy ----------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_repr_names_hyperparameters(name, kw, capsys):
    opt = FAST[name](_model().parameters(), **kw)
    print(opt)
    text = capsys.readouterr().out
    assert text.strip() == repr(opt).strip()
    assert text.startswith(name + " (")
    assert "Parameter Group 0" in text
    for k, v in kw.items():
        assert f"{k}: {v}" in text, (k, text)
    for k in TORCH[name](_model().parameters(), **kw).defaults:
        assert f"{k}: " in text, (k, text)


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_deepcopy_steps_independently(name, kw):
    sign = _sign(kw)
    model = _model()
    opt = FAST[name](model.parameters(), **kw)
    _train(model, opt, 2, sign=sign)
    opt.zero_grad()
    _loss(model, 2, sign).backward()

    clone = copy.deepcopy(opt)
    assert type(clone) is type(opt)
    orig_params = _snapshot(model.parameters())
    orig_state = copy.deepcopy(_state_list(opt, model.parameters()))
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params, model.parameters()))
    for c, p in zip(clone_params, model.parameters()):
        assert c.grad is None  # Parameter.__deepcopy__ does not copy .grad
        c.grad = p.grad.clone()

    clone.step()  # must not touch the original's params or state
    for b, p in zip(orig_params, model.parameters()):
        assert _bits_equal(b, p)
    _assert_state_close(name, orig_state, _state_list(opt, model.parameters()), exact=True)
    assert any(not torch.equal(b, c) for b, c in zip(orig_params, clone_params))

    opt.step()  # same state, same grads: the same result
    _assert_params_equal(model.parameters(), clone_params)
    after = _snapshot(clone_params)
    _train(model, opt, 2, start=3, sign=sign)
    _assert_params_equal(after, clone_params)


# -- 8. ways of passing params ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["generator", "list", "tuple"])
@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_params_as_iterable(name, kw, form):
    mf, mt = _model(), _model()
    wrap = {"generator": lambda m: m.parameters(), "list": lambda m: list(m.parameters()),
            "tuple": lambda m: tuple(m.parameters())}[form]
    of = FAST[name](wrap(mf), **kw)
    ot = TORCH[name](wrap(mt), **kw)
    assert len(of.param_groups) == 1 and len(of.param_groups[0]["params"]) == 4
    _train(mf, of, 4)
    _train(mt, ot, 4)
    _assert_params_close(name, mf.parameters(), mt.parameters())


_PER_GROUP = {
    "SGD": dict(lr=0.02, momentum=0.5, dampening=0.2, weight_decay=0.1),
    "Adam": dict(lr=0.01, betas=(0.7, 0.9), weight_decay=0.05, amsgrad=False),
    "AdamW": dict(lr=0.01, betas=(0.7, 0.9), weight_decay=0.5, eps=1e-4),
    "Adagrad": dict(lr=0.02, lr_decay=0.1, initial_accumulator_value=0.5, weight_decay=0.1),
}


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_param_groups_with_per_group_hyperparameters(name, kw):
    def groups(m):
        return [{"params": m[0].parameters()}, {"params": list(m[2].parameters()), **_PER_GROUP[name]}]

    mf, mt = _model(), _model()
    of = FAST[name](groups(mf), **kw)
    ot = TORCH[name](groups(mt), **kw)
    assert len(of.param_groups) == 2
    for k, v in _PER_GROUP[name].items():
        assert of.param_groups[1][k] == v
    _train(mf, of, 4)
    _train(mt, ot, 4)
    _assert_params_close(name, mf.parameters(), mt.parameters())
    assert of.state_dict()["param_groups"] == ot.state_dict()["param_groups"]


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_named_parameters(name, kw):
    mf, mt = _model(), _model()
    of = FAST[name](mf.named_parameters(), **kw)
    ot = TORCH[name](mt.named_parameters(), **kw)
    assert of.param_groups[0]["param_names"] == [n for n, _ in mf.named_parameters()]
    _train(mf, of, 3)
    _train(mt, ot, 3)
    _assert_params_close(name, mf.parameters(), mt.parameters())
    assert of.state_dict()["param_groups"] == ot.state_dict()["param_groups"]
    # Named parameters inside param-group dicts, with per-group hyperparameters.
    m2 = _model()
    o2 = FAST[name]([{"params": m2[0].named_parameters()},
                     {"params": m2[2].named_parameters(), "lr": 1e-3}], **kw)
    assert o2.param_groups[1]["param_names"] == ["weight", "bias"]
    _train(m2, o2, 1)


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_add_param_group_after_construction(name, kw):
    mf, mt = _model(), _model()
    of = FAST[name](mf[0].parameters(), **kw)
    ot = TORCH[name](mt[0].parameters(), **kw)
    _train(mf, of, 2)
    _train(mt, ot, 2)
    before = _snapshot(mf[2].parameters())
    for bad in (torch.zeros(3, dtype=torch.float64, requires_grad=True),):
        with pytest.raises(TypeError, match="float32"):
            of.add_param_group({"params": [bad]})
    assert len(of.param_groups) == 1
    of.add_param_group({"params": mf[2].parameters(), "lr": 0.03})
    ot.add_param_group({"params": mt[2].parameters(), "lr": 0.03})
    assert of.param_groups[1]["lr"] == 0.03
    _train(mf, of, 3, start=2)
    _train(mt, ot, 3, start=2)
    assert all(not torch.equal(b, p) for b, p in zip(before, mf[2].parameters()))
    _assert_params_close(name, mf.parameters(), mt.parameters())


# -- 9. zero_grad and closures ----------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False, None])
@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_zero_grad(name, kw, set_to_none):
    model = _model()
    opt = FAST[name](model.parameters(), **kw)
    _loss(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())
    if set_to_none is None:
        opt.zero_grad()  # the default is set_to_none=True
    else:
        opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none is False:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        else:
            assert p.grad is None


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_step_with_closure(name, kw):
    mf, of, mt, ot = _pair(name, kw)
    seen: List[torch.Tensor] = []

    def closure_for(model, opt, record):
        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = _loss(model, 0)
            loss.backward()
            if record:
                seen.append(loss)
            return loss
        return closure

    for _ in range(3):
        ret = of.step(closure_for(mf, of, True))
        assert ret is seen[-1]
        ot.step(closure_for(mt, ot, False))
    assert len(seen) == 3
    assert seen[-1].item() < seen[0].item()
    _assert_params_close(name, mf.parameters(), mt.parameters())
    # Without a closure, step returns None.
    assert of.step() is None


# -- 10. step hooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_step_hooks_fire_once_per_step(name, kw):
    model = _model()
    opt = FAST[name](model.parameters(), **kw)
    w = model[0].weight
    pre: List[torch.Tensor] = []
    post: List[torch.Tensor] = []

    def pre_hook(o, args, kwargs):
        assert o is opt
        pre.append(w.detach().clone())

    def post_hook(o, args, kwargs):
        assert o is opt
        post.append(w.detach().clone())

    h_pre = opt.register_step_pre_hook(pre_hook)
    h_post = opt.register_step_post_hook(post_hook)
    values = []

    def record(i):
        values.append(w.detach().clone())

    _train(model, opt, 3, after_step=record)
    assert len(pre) == 3 and len(post) == 3
    for i in range(3):
        assert torch.equal(post[i], values[i])  # post hook runs after the update
        if i > 0:
            assert torch.equal(pre[i], values[i - 1])  # pre hook runs before it
        assert not torch.equal(pre[i], post[i])
    h_pre.remove()
    h_post.remove()
    _train(model, opt, 1, start=3)
    assert len(pre) == 3 and len(post) == 3


# -- 11. LR schedulers -------------------------------------------------------------------------

SCHEDULERS = ["StepLR", "ExponentialLR", "CosineAnnealingLR", "LambdaLR", "OneCycleLR",
              "ReduceLROnPlateau", "manual"]
_STEPS = 10


def _make_scheduler(kind: str, name: str, opt: torch.optim.Optimizer, lr: float):
    S = torch.optim.lr_scheduler
    if kind == "StepLR":
        return S.StepLR(opt, step_size=3, gamma=0.5)
    if kind == "ExponentialLR":
        return S.ExponentialLR(opt, gamma=0.8)
    if kind == "CosineAnnealingLR":
        return S.CosineAnnealingLR(opt, T_max=_STEPS)
    if kind == "LambdaLR":
        return S.LambdaLR(opt, lambda epoch: 1.0 / (1.0 + epoch))
    if kind == "OneCycleLR":
        # Cycles momentum for SGD and beta1 for Adam/AdamW; Adagrad has neither.
        return S.OneCycleLR(opt, max_lr=lr, total_steps=_STEPS, cycle_momentum=name != "Adagrad")
    if kind == "ReduceLROnPlateau":
        return S.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    assert kind == "manual"
    return None


def _scheduler_step(kind: str, sched, opt: torch.optim.Optimizer, i: int, lr: float) -> None:
    if kind == "ReduceLROnPlateau":
        sched.step(1.0)  # a metric that never improves: lr halves every other step
    elif kind == "manual":
        opt.param_groups[0]["lr"] = lr * 0.7 ** (i + 1)
    else:
        sched.step()


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("name,kw", CONFIGS)
def test_lr_scheduler_matches_torch(name, kw, kind):
    mf, of, mt, ot = _pair(name, kw)
    lr = kw["lr"]
    sf = _make_scheduler(kind, name, of, lr)
    st = _make_scheduler(kind, name, ot, lr)
    sign = _sign(kw)
    lrs, momenta = set(), set()
    for i in range(_STEPS):
        for model, opt, sched in ((mf, of, sf), (mt, ot, st)):
            _train(model, opt, 1, start=i, sign=sign)
            _scheduler_step(kind, sched, opt, i, lr)
        assert _hyperparameters(of) == _hyperparameters(ot)
        _assert_params_close(name, mf.parameters(), mt.parameters())
        lrs.add(of.param_groups[0]["lr"])
        momenta.add(of.param_groups[0].get("momentum", of.param_groups[0].get("betas")))
    _assert_state_close(name, _state_list(of, mf.parameters()), _state_list(ot, mt.parameters()))
    assert len(lrs) > 1  # the schedule did change the learning rate
    if kind == "OneCycleLR" and name != "Adagrad":
        assert len(momenta) > 1  # and momentum / beta1


# -- 12. GradScaler ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_grad_scaler_skips_non_finite_steps(name, kw):
    mf, of, mt, ot = _pair(name, kw)
    sign = _sign(kw)
    sequence = ["ok", "inf", "ok", "nan", "ok", "ok"]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) for _ in range(2)]
    for i, kind in enumerate(sequence):
        results = []
        for model, opt, scaler in ((mf, of, scalers[0]), (mt, ot, scalers[1])):
            opt.zero_grad()
            scaler.scale(_loss(model, i, sign)).backward()
            if kind != "ok":
                model[0].weight.grad[1, 2] = float(kind)
            params = _snapshot(model.parameters())
            state = copy.deepcopy(_state_list(opt, model.parameters()))
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            results.append(scaler.get_scale())
            if kind == "ok":
                assert any(not torch.equal(b, p) for b, p in zip(params, model.parameters()))
                assert scaler.get_scale() >= scale
            else:
                for b, p in zip(params, model.parameters()):
                    assert _bits_equal(b, p)
                _assert_state_close(name, state, _state_list(opt, model.parameters()), exact=True)
                assert scaler.get_scale() < scale
        assert results[0] == results[1]
        _assert_params_close(name, mf.parameters(), mt.parameters())
    _assert_state_close(name, _state_list(of, mf.parameters()), _state_list(ot, mt.parameters()))


# -- 13. bad input -----------------------------------------------------------------------------


def _param(dtype=torch.float32, device="cpu") -> nn.Parameter:
    return nn.Parameter(torch.zeros(3, 2, dtype=dtype, device=device))


@pytest.mark.parametrize("what", ["float64", "bfloat16", "meta"])
@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_unsupported_param_raises_type_error(name, kw, what):
    p = {"float64": lambda: _param(torch.float64), "bfloat16": lambda: _param(torch.bfloat16),
         "meta": lambda: _param(device="meta")}[what]()
    with pytest.raises(TypeError, match="float32"):
        FAST[name]([p], **kw)
    with pytest.raises(TypeError, match="float32"):
        FAST[name]([{"params": [_param()]}, {"params": [p]}], **kw)
    opt = FAST[name]([_param()], **kw)
    with pytest.raises(TypeError, match="float32"):
        opt.add_param_group({"params": p})


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_param_changed_to_float64_after_construction_raises_in_step(name, kw):
    p = _param()
    opt = FAST[name]([p], **kw)
    p.data = p.data.double()
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="float32"):
        opt.step()


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_sparse_grad_raises_type_error(name, kw):
    p = _param()
    opt = FAST[name]([p], **kw)
    p.grad = torch.ones(3, 2).to_sparse()
    before = p.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert _bits_equal(before, p)


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_sparse_grad_error_mentions_float32(name, kw):
    p = _param()
    opt = FAST[name]([p], **kw)
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(TypeError, match="float32"):
        opt.step()


BAD_HYPER = [
    ("SGD", dict(lr=-1), "Invalid learning rate"),
    ("Adam", dict(lr=-1), "Invalid learning rate"),
    ("AdamW", dict(lr=-1), "Invalid learning rate"),
    ("Adagrad", dict(lr=-1), "Invalid learning rate"),
    ("Adam", dict(betas=(1.5, 0.9)), "Invalid beta parameter at index 0"),
    ("AdamW", dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1"),
    ("Adam", dict(eps=-1), "Invalid epsilon value"),
    ("AdamW", dict(eps=-1), "Invalid epsilon value"),
    ("Adagrad", dict(eps=-1), "Invalid epsilon value"),
    ("SGD", dict(lr=0.1, momentum=-1), "Invalid momentum value"),
    ("SGD", dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(lr=0.1, weight_decay=-1), "Invalid weight_decay value"),
    ("Adam", dict(weight_decay=-1), "Invalid weight_decay value"),
    ("Adagrad", dict(lr_decay=-1), "Invalid lr_decay value"),
    ("Adagrad", dict(initial_accumulator_value=-1), "Invalid initial_accumulator_value value"),
]


@pytest.mark.parametrize("name,kw,message", BAD_HYPER, ids=[f"{n}-{'-'.join(k)}" for n, k, _ in BAD_HYPER])
def test_bad_hyperparameters_raise_torch_value_error(name, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)) as torch_err:
        TORCH[name]([_param()], **kw)
    with pytest.raises(ValueError, match=re.escape(message)) as ours:
        FAST[name]([_param()], **kw)
    assert str(ours.value) == str(torch_err.value)


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_differentiable_group_is_rejected(name, kw):
    opt = FAST[name]([_param()], **kw)
    with pytest.raises(ValueError, match="differentiable"):
        opt.add_param_group({"params": [_param()], "differentiable": True})


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_differentiable_is_rejected(name, kw):
    with pytest.raises(ValueError, match="differentiable"):
        FAST[name]([_param()], differentiable=True, **kw)


# -- 14. subclassing and defaults --------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_is_torch_optimizer_with_torch_defaults(name, kw):
    p, q = _param(), _param()
    ours = FAST[name]([p], **kw)
    theirs = TORCH[name]([q], **kw)
    assert isinstance(ours, TORCH[name])
    assert isinstance(ours, torch.optim.Optimizer)
    assert issubclass(FAST[name], TORCH[name])
    assert type(ours).__name__ == name
    assert ours.defaults == theirs.defaults
    assert _hyperparameters(ours) == _hyperparameters(theirs)
    # And with every argument left at its default.
    assert FAST[name]([_param()]).defaults == TORCH[name]([_param()]).defaults


# -- failure atomicity and edge cases --------------------------------------------------------


@pytest.mark.parametrize("name,kw", [
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="SGD"),
    pytest.param("Adam", dict(lr=0.1), id="Adam"),
    pytest.param("AdamW", dict(lr=0.1), id="AdamW"),
    pytest.param("Adagrad", dict(lr=0.1, lr_decay=0.5), id="Adagrad"),
])
def test_failed_step_does_not_corrupt_state(name, kw):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(257)), nn.Parameter(torch.randn(4))
    ra, rb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt = FAST[name]([a, b], **kw)
    ref = FAST[name]([ra, rb], **kw)  # never sees the failed step
    torch.full((257,), 1e30).sum()  # leave non-zero bytes in freed memory
    a.grad = torch.ones(257)
    b.grad = torch.ones(4).to_sparse()
    with pytest.raises(TypeError):
        opt.step()
    assert _bits_equal(a, ra)
    for p, q in ((a, ra), (b, rb)):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    ref.step()
    assert torch.equal(a, ra) and torch.equal(b, rb)


@pytest.mark.parametrize("name,kw", ONE_EACH)
def test_zero_element_param(name, kw):
    pf, ef = nn.Parameter(torch.ones(3)), nn.Parameter(torch.empty(0))
    pt, et = nn.Parameter(torch.ones(3)), nn.Parameter(torch.empty(0))
    of, ot = FAST[name]([pf, ef], **kw), TORCH[name]([pt, et], **kw)
    for p in (pf, ef, pt, et):
        p.grad = torch.full_like(p, 0.5)
    ot.step()
    of.step()
    _assert_params_close(name, [pf, ef], [pt, et])
