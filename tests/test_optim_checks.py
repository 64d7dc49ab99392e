"""What fastps checks before a tensor's memory is used by the native core, and
how it treats parameters that share memory (issue 16, items 2 and 5).

- An optimizer state dict whose tensors do not fit the parameters (saved for
  another model) is refused by ``load_state_dict`` with a typed error, and the
  optimizer is left as it was, in the embedded and the distributed mode alike
  (the distributed mode read past the small tensors: garbage, or SIGSEGV).
- Every native call that takes an address also takes its element count, and
  checks it before the address is used.
- A parameter listed twice, or parameters that are overlapping views of one
  tensor, are refused by fastps.optim in both modes (the distributed mode
  updated a duplicate once and lost an update on an overlap);
  DistributedOptimizer keeps torch's semantics.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastps
from fastps import _C, _runtime

import _optim_cases
from _launch import Job, check


# -- load_state_dict ----------------------------------------------------------------

def _one_step(model, opt):
    opt.zero_grad()
    model(torch.ones(4, model.in_features)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("name,kw,key", [("SGD", dict(lr=0.1, momentum=0.9), "momentum_buffer"),
                                         ("Adam", dict(lr=0.1), "exp_avg"),
                                         ("AdamW", dict(lr=0.1), "exp_avg"),
                                         ("Adagrad", dict(lr=0.1), "sum")])
def test_state_of_another_shape_is_refused_at_load_and_the_optimizer_is_kept(name, kw, key):
    small = nn.Linear(2, 2)
    ref = getattr(torch.optim, name)(small.parameters(), **kw)
    small(torch.ones(3, 2)).sum().backward()
    ref.step()
    wrong = ref.state_dict()
    model = nn.Linear(16, 16)
    opt = getattr(fastps.optim, name)(model.parameters(), **kw)
    _one_step(model, opt)
    twin = nn.Linear(16, 16)
    twin.load_state_dict(model.state_dict())
    topt = getattr(torch.optim, name)(twin.parameters(), **kw)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch would share the tensors)
    message = rf"state '{key}' of parameter 0 has shape \(2, 2\), but the parameter has shape \(16, 16\)"
    with pytest.raises(fastps.InvalidArgumentError, match=message):
        opt.load_state_dict(wrong)
    # Left as it was: it continues exactly as torch does from the same state.
    for _ in range(2):
        _one_step(model, opt)
        _one_step(twin, topt)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_state_error_is_a_value_error_naming_the_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(3, 3))
    opt = fastps.optim.Adam(model.named_parameters(), lr=0.1)
    good = nn.Sequential(nn.Linear(2, 2), nn.Linear(3, 3))
    tref = torch.optim.Adam(good.parameters(), lr=0.1)
    for p in good.parameters():
        p.grad = torch.ones_like(p)
    tref.step()
    sd = tref.state_dict()
    sd["state"][2]["exp_avg_sq"] = torch.zeros(5)  # parameter 2: the second layer's weight
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter 2 \('1.weight'\) has shape \(5,\)"):
        opt.load_state_dict(sd)
    sd["state"][2]["exp_avg_sq"] = torch.zeros(3, 3)
    sd["state"][1]["step"] = torch.zeros(2)
    with pytest.raises(fastps.InvalidArgumentError, match=r"'step' of parameter 1 \('0.bias'\) is a shape \(2,\)"):
        opt.load_state_dict(sd)
    sd["state"][1]["step"] = torch.tensor(1.0)
    opt.load_state_dict(sd)  # now it fits


def test_state_of_another_dtype_is_cast_as_torch_does():
    torch.manual_seed(3)
    model, twin = nn.Linear(8, 8), nn.Linear(8, 8)
    twin.load_state_dict(model.state_dict())
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    _one_step(model, ref)
    sd = ref.state_dict()
    for st in sd["state"].values():
        st["exp_avg"] = st["exp_avg"].double()
    twin.load_state_dict(model.state_dict())
    opt = fastps.optim.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(sd))
    topt = torch.optim.Adam(twin.parameters(), lr=0.01)
    topt.load_state_dict(copy.deepcopy(sd))
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float32
    _one_step(model, opt)
    _one_step(twin, topt)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def _run(tmp_path: Path, workers: int, mode: str):
    """The results of tests/_optim_cases.py's case `mode`: in this process (workers=1,
    the embedded mode), or from each rank of a job of `workers` (the distributed mode)."""
    if workers == 1:
        return [{"bad_state": _optim_cases.bad_state, "shared": _optim_cases.shared_storage}[mode]()]
    out = tmp_path / mode
    with Job(workers, [mode, str(out)]) as job:
        check(job.wait())
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(workers)]


def _bad_state_reference():
    torch.manual_seed(1)
    model = nn.Linear(64, 64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.ones(4, 64), torch.zeros(4, 64)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("workers", [2, 1], ids=["distributed", "embedded"])
def test_mismatched_state_dict_is_refused_in_both_modes(tmp_path, workers):
    """Adam state of nn.Linear(2, 2) loaded into nn.Linear(64, 64) was accepted by
    the distributed mode (whose parameters went non-finite), and into
    nn.Linear(1024, 1024) it read far past the small tensors (SIGSEGV)."""
    ref = _bad_state_reference()
    torch.manual_seed(2)
    model = nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):  # 2 steps, a float64 reload (cast to float32), 2 more
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.ones(4, 8)), torch.zeros(4, 8)).backward()
        opt.step()
    for res in _run(tmp_path, workers, "bad_state"):
        for n in (64, 1024):
            assert res[f"error{n}"].startswith("fastps: the optimizer state 'exp_avg' of parameter 0 has shape "
                                               f"(2, 2), but the parameter has shape ({n}, {n})"), res[f"error{n}"]
            assert res[f"kept{n}"] and res[f"finite{n}"]
        for p, q in zip(res["params64"], ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, q in zip(res["cast"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


# -- the native layer: every address comes with its count ----------------------------------

def _hyper():
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    h.lr = 1.0
    return h


def test_embedded_client_checks_every_count():
    emb = _runtime.embedded()
    tid = _runtime.next_tensor_id()
    p, state, small = torch.zeros(4096), torch.zeros(4096), torch.zeros(2)
    step = torch.zeros(1)
    register = emb.client.register_dense
    with pytest.raises(fastps.InvalidArgumentError, match="state buffer 0 holds 2 floats where the parameter has 4096"):
        register(tid, p.data_ptr(), 4096, [small.data_ptr()], [2], 0, 0, True)
    with pytest.raises(fastps.InvalidArgumentError, match="1 state buffers but 0 counts"):
        register(tid, p.data_ptr(), 4096, [state.data_ptr()], [], 0, 0, True)
    with pytest.raises(fastps.InvalidArgumentError, match="step counter holds 4 floats"):
        register(tid, p.data_ptr(), 4096, [state.data_ptr()], [4096], step.data_ptr(), 4, True)
    with pytest.raises(fastps.InvalidArgumentError, match="parameter is a null pointer"):
        register(tid, 0, 4096, [], [], 0, 0, True)
    assert not emb.client.is_registered(tid)
    register(tid, p.data_ptr(), 4096, [state.data_ptr()], [4096], step.data_ptr(), 1, True)
    try:
        h = _hyper()
        with pytest.raises(fastps.InvalidArgumentError, match="gradient holds 2 floats where the parameter has 4096"):
            emb.client.update([tid], [small.data_ptr()], [2], [0], [h])
        with pytest.raises(fastps.InvalidArgumentError, match="differ in length"):
            emb.client.update([tid], [small.data_ptr()], [], [0], [h])
        assert torch.equal(step, torch.zeros(1)) and torch.equal(p, torch.zeros(4096))  # nothing changed
        g = torch.ones(4096)
        emb.client.update([tid], [g.data_ptr()], [4096], [0], [h])
        assert torch.equal(p, torch.full((4096,), -1.0))
    finally:
        emb.client.unregister_dense(tid)


@pytest.fixture
def ps_client():
    server = _C.PsServer(0, 1, secret="s")
    client = _C.PsClient(0, secret="s", timeout_s=10, chunk_bytes=4096)
    client.connect([("127.0.0.1", server.port)])
    yield client
    del client, server


def test_ps_client_checks_every_count_before_sending(ps_client):
    c, h, n = ps_client, _hyper(), 5000
    p, small = torch.arange(n, dtype=torch.float32), torch.zeros(2)
    with pytest.raises(fastps.InvalidArgumentError, match="REGISTER of tensor 1: the initial value holds 2 floats "
                                                          "where the request reads or writes 5000"):
        c.register_dense(1, n, False, h, small.data_ptr(), 2)
    c.register_dense(1, n, False, h, p.data_ptr(), n).wait()
    bad = [
        ("PUSH of tensor 1: the gradient holds 2", lambda: c.push(1, small.data_ptr(), 2, h, 1)),
        ("PUSH of tensor 1: the gradient is a null pointer", lambda: c.push(1, 0, n, h, 1)),
        ("PULL of tensor 1: the destination holds 2", lambda: c.pull(1, small.data_ptr(), 2, 0)),
        ("PULL of tensor 1: the destination is a null pointer", lambda: c.pull(1, 0, n, 0)),
        ("PUSH_PULL of tensor 1: the source holds 2", lambda: c.push_pull(1, small.data_ptr(), 2, p.data_ptr(), n, 1)),
        ("PUSH_PULL of tensor 1: the destination holds 2",
         lambda: c.push_pull(1, p.data_ptr(), n, small.data_ptr(), 2, 1)),
        ("STATE_GET of tensor 1: the destination holds 2", lambda: c.state_get(1, 1, small.data_ptr(), 2)),
        ("STATE_GET of tensor 1: the step counter holds 2", lambda: c.state_get(1, 255, small.data_ptr(), 2)),
        ("STATE_SET of tensor 1: the source holds 2", lambda: c.state_set(1, 0, small.data_ptr(), 2)),
        ("STATE_SET of tensor 1: the step counter holds 5000", lambda: c.state_set(1, 255, p.data_ptr(), n)),
        ("STATE_SET of tensor 1: buffer 7 does not exist", lambda: c.state_set(1, 7, p.data_ptr(), n)),
        ("PULL of tensor 2 .*|tensor 2 is not registered", lambda: c.pull(2, p.data_ptr(), n, 0)),
    ]
    for message, call in bad:
        with pytest.raises(fastps.InvalidArgumentError, match=message):
            call()
    # Nothing reached the server: the tensor is as registered, and the calls work with right counts.
    out = torch.empty(n)
    c.pull(1, out.data_ptr(), n, 0).wait()
    assert torch.equal(out, p)
    g = torch.ones(n)
    c.push(1, g.data_ptr(), n, h, 1).wait()
    c.state_get(1, 0, out.data_ptr(), n).wait()
    assert torch.equal(out, p - 1)


def test_sparse_table_calls_check_counts_and_chains():
    t = _C.SparseTable(_C.Server(2), 4, init=_C.SparseInit.ZEROS)
    ids = torch.arange(3, dtype=torch.int64)
    small, out, g = torch.zeros(2), torch.zeros(3, 4), torch.ones(3, 4)
    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    with pytest.raises(fastps.InvalidArgumentError, match="sparse pull: out holds 2 elements where the call uses 12"):
        t.pull(ids.data_ptr(), 3, small.data_ptr(), 2)
    with pytest.raises(fastps.InvalidArgumentError, match="sparse push: grads holds 2 elements where the call uses 12"):
        t.push(ids.data_ptr(), 3, small.data_ptr(), 2, sgd, 1)
    assert len(t) == 0
    t.push(ids.data_ptr(), 3, g.data_ptr(), g.numel(), sgd, 1)
    # pull_scatter: 3 unique ids to 5 rows of out through chains
    first, out5 = torch.tensor([0, 1, 2]), torch.zeros(5, 4)
    bad = [
        ("out holds 12 elements where the call uses 20", torch.tensor([3, 4, -1, -1, -1]), out),
        (r"next\[1\] is 0; a chain goes on to a later row", torch.tensor([3, 0, -1, -1, -1]), out5),
        (r"next\[0\] is 5", torch.tensor([5, 4, -1, -1, -1]), out5),
    ]
    for message, nxt, o in bad:
        with pytest.raises(fastps.InvalidArgumentError, match=message):
            t.pull_scatter(ids.data_ptr(), 3, first.data_ptr(), nxt.data_ptr(), 5, o.data_ptr(), o.numel())
    nxt = torch.tensor([3, 4, -1, -1, -1])
    with pytest.raises(fastps.InvalidArgumentError, match=r"first\[2\] is 7, outside \[0, 5\)"):
        far = torch.tensor([0, 1, 7])
        t.pull_scatter(ids.data_ptr(), 3, far.data_ptr(), nxt.data_ptr(), 5, out5.data_ptr(), out5.numel())
    t.pull_scatter(ids.data_ptr(), 3, first.data_ptr(), nxt.data_ptr(), 5, out5.data_ptr(), out5.numel())
    assert torch.equal(out5, torch.full((5, 4), -1.0))


def test_embedding_ops_check_counts_and_indices():
    ids, uids, inv = torch.tensor([5, 7, 5]), torch.empty(3, dtype=torch.int64), torch.empty(3, dtype=torch.int64)
    with pytest.raises(fastps.InvalidArgumentError, match="embedding_unique: uids holds 2 elements"):
        _C.embedding_unique(ids.data_ptr(), 3, uids.data_ptr(), 2, inv.data_ptr(), 3, False)
    assert _C.embedding_unique(ids.data_ptr(), 3, uids.data_ptr(), 3, inv.data_ptr(), 3, False)[0] == 2
    bad_inv = torch.tensor([0, 1, 9])
    rows, out = torch.ones(2, 4), torch.empty(3, 4)
    with pytest.raises(fastps.InvalidArgumentError, match=r"embedding_gather: inverse\[2\] is 9, outside \[0, 2\)"):
        _C.embedding_gather(rows.data_ptr(), rows.numel(), bad_inv.data_ptr(), 3, 4, out.data_ptr(), out.numel())
    with pytest.raises(fastps.InvalidArgumentError, match="embedding_gather: out holds 4 elements"):
        _C.embedding_gather(rows.data_ptr(), rows.numel(), inv.data_ptr(), 3, 4, out.data_ptr(), 4)
    first, nxt = torch.empty(2, dtype=torch.int64), torch.empty(3, dtype=torch.int64)
    with pytest.raises(fastps.InvalidArgumentError, match=r"embedding_chains: inverse\[2\] is 9"):
        _C.embedding_chains(bad_inv.data_ptr(), 3, 2, first.data_ptr(), 2, nxt.data_ptr(), 3)
    grads, sums = torch.ones(3, 4), torch.empty(2, 4)
    with pytest.raises(fastps.InvalidArgumentError, match=r"embedding_segment_sum: inverse\[2\] is 9"):
        _C.embedding_segment_sum(grads.data_ptr(), 12, bad_inv.data_ptr(), 3, 4, 2, sums.data_ptr(), 8)
    with pytest.raises(fastps.InvalidArgumentError, match="embedding_segment_sum: out holds 4 elements"):
        _C.embedding_segment_sum(grads.data_ptr(), 12, inv.data_ptr(), 3, 4, 2, sums.data_ptr(), 4)
    _C.embedding_segment_sum(grads.data_ptr(), 12, inv.data_ptr(), 3, 4, 2, sums.data_ptr(), 8)
    assert torch.equal(sums, torch.tensor([[2.0] * 4, [1.0] * 4]))


def test_ps_client_sparse_calls_check_counts(ps_client):
    c = ps_client
    c.sparse_create(1, _C.SparseTableConfig(4, init=_C.SparseInit.ZEROS)).wait()
    ids, small = torch.arange(3), torch.zeros(2)
    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    with pytest.raises(fastps.InvalidArgumentError, match="sparse pull: out holds 2 elements where the call uses 12"):
        c.sparse_pull(1, ids.data_ptr(), 3, 4, small.data_ptr(), 2, 0)
    with pytest.raises(fastps.InvalidArgumentError, match="sparse push: grads holds 2 elements where the call uses 12"):
        c.sparse_push(1, ids.data_ptr(), 3, 4, small.data_ptr(), 2, sgd, 1)
    g, out = torch.ones(3, 4), torch.empty(3, 4)
    c.sparse_push(1, ids.data_ptr(), 3, 4, g.data_ptr(), g.numel(), sgd, 1).wait()
    c.sparse_pull(1, ids.data_ptr(), 3, 4, out.data_ptr(), out.numel(), 1).wait()
    assert torch.equal(out, torch.full((3, 4), -1.0))


# -- parameters that share memory ---------------------------------------------------------

def test_duplicate_parameter_is_refused_before_torchs_warning():
    q = nn.Parameter(torch.zeros(3))
    with pytest.raises(fastps.InvalidArgumentError, match="parameter 1 is parameter 0 again"):
        fastps.optim.Adam([q, q], lr=1.0)  # warnings are errors here: torch's would fail differently
    opt = fastps.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match="parameter 2 is parameter 1 again"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1


def test_overlapping_views_are_refused_and_disjoint_views_match_torch():
    base = torch.zeros(6)
    p1, p2 = nn.Parameter(base[0:4]), nn.Parameter(base[2:6])
    with pytest.raises(fastps.InvalidArgumentError, match="parameters 0 and 1 share memory"):
        fastps.optim.SGD([p1, p2], lr=1.0)
    opt = fastps.optim.SGD([p1], lr=1.0)
    with pytest.raises(fastps.InvalidArgumentError, match="parameters 0 and 1 share memory"):
        opt.add_param_group({"params": [p2]})
    with pytest.raises(fastps.InvalidArgumentError, match="share memory"):  # the same memory, another tensor
        fastps.optim.SGD([p1, nn.Parameter(p1.data)], lr=1.0)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check stays
        opt.add_param_group({"params": [p1]})
    # Views that do not overlap: separate parameters, as in torch.
    results = []
    for optim in (fastps.optim, torch.optim):
        flat = torch.zeros(8)
        a, b = nn.Parameter(flat[:4]), nn.Parameter(flat[4:])
        o = optim.Adam([a, b], lr=0.5)
        a.grad, b.grad = torch.full((4,), 5.0), torch.full((4,), -6.0)
        o.step()
        results.append(flat)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_shared_storage_is_treated_alike_in_both_modes(tmp_path):
    """The distributed mode lost one update on an overlap (-10 where torch has -11)
    and updated a duplicate once (torch and the embedded mode: twice). Both modes
    now refuse both, with the same message; DistributedOptimizer steps the torch
    optimizer it wraps, so it has torch's semantics in both modes. A strided view
    under DistributedOptimizer starts from rank 0's values (it got other elements)."""
    embedded, = _run(tmp_path, 1, "shared")
    results = _run(tmp_path, 2, "shared")
    for res in results + [embedded]:
        for key in ("overlap", "overlap_group", "duplicate", "duplicate_group"):
            assert res[key] == embedded[key], (key, res[key])
        assert "share memory" in res["overlap"] and "share memory" in res["overlap_group"]
        assert "again" in res["duplicate"] and "again" in res["duplicate_group"]
        assert torch.equal(res["disjoint"], torch.tensor([-5.0, -5, -5, -6, -6, -6]))
        assert torch.equal(res["wrap_overlap"], torch.tensor([-5.0, -5, -11, -11, -6, -6]))
        assert torch.equal(res["wrap_duplicate"], torch.full((3,), -2.0))
    for r, res in enumerate(results):  # rank 0's values in the view, each rank's own elsewhere
        assert torch.equal(res["wrap_strided"], torch.tensor([-1.0, 1, 1, 3, 3, 5, 5, 7]) + 100 * r * (
            torch.arange(8) % 2)), res["wrap_strided"]
    # torch itself, for the record of what "torch's semantics" is
    base = torch.zeros(6)
    c, d = nn.Parameter(base[0:4]), nn.Parameter(base[2:6])
    o = torch.optim.SGD([c, d], lr=1.0)
    c.grad, d.grad = torch.full((4,), 5.0), torch.full((4,), 6.0)
    o.step()
    assert torch.equal(base, embedded["wrap_overlap"])
    e = nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = torch.optim.SGD([e, e], lr=1.0)
    e.grad = torch.ones(3)
    o.step()
    assert torch.equal(e.detach(), embedded["wrap_duplicate"])
