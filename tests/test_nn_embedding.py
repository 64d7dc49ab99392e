"""fastps.nn.Embedding / EmbeddingBag trained by fastps.optim (embedded mode).

Contract (docs/sparse.md, "fastps.nn"):
  * forward equals torch.nn.Embedding / EmbeddingBag on the same rows, exactly;
  * fastps.optim.Adam trains the rows as torch.optim.SparseAdam does (lazy
    Adam), fastps.optim.Adagrad as torch.optim.Adagrad on sparse gradients,
    both to rtol 1e-6 (torch's vectorised sqrt is not always correctly
    rounded; see tests/test_sparse_table.py), fastps.optim.SGD exactly;
  * gradients of several backward passes before one step sum per id;
  * the param group's hyperparameters (and LR schedulers) apply; weight decay,
    momentum and amsgrad raise before anything changes;
  * state_dict / save / load round-trip the table exactly;
  * misuse (torch.optim, bad ids, a full table) raises a clear typed error.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastps
from fastps import _C
from fastps.errors import FastPSError, InvalidArgumentError

N, D, STEPS = 48, 32, 30  # D: a multiple of every vector width (torch's tail loop may differ)
TOL = dict(rtol=1e-6, atol=1e-7)


def _batch(gen: torch.Generator, shape=(4, 6), high: int = 40) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen)  # ids 40..N-1 are never touched


def _zero(*opts):
    for o in opts:
        o.zero_grad()


def _step_pair(mod, ref, opt, ropt, args, grad):
    """One training step of the fastps module and its torch twin on the same input:
    outputs must be equal; `grad` is the upstream gradient, or a function of the output."""
    out, rout = mod(*args), ref(*args)
    assert torch.equal(out, rout)
    g = grad(out) if callable(grad) else grad
    out.backward(g)
    rout.backward(g)
    opt.step()
    ropt.step()
    _zero(opt, ropt)


def _sparse_parity(make_fastps, make_torch, *, exact_init_check: bool = True):
    gen = torch.Generator().manual_seed(5)
    emb = fastps.nn.Embedding(D, num_embeddings=N, init="normal", std=0.5, seed=3)
    ref = nn.Embedding(N, D, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(emb.lookup(torch.arange(N)))
    init = ref.weight.detach().clone()
    opt, ropt = make_fastps(emb.parameters()), make_torch(ref.parameters())
    touched = set()
    for _ in range(STEPS):
        ids = _batch(gen)
        touched.update(ids.flatten().tolist())
        g = torch.randn(*ids.shape, D, generator=gen)
        out, rout = emb(ids), ref(ids)
        torch.testing.assert_close(out, rout, **TOL)
        out.backward(g)
        with torch.sparse.check_sparse_tensor_invariants(enable=True):  # opt in: no warning
            rout.backward(g)
            ropt.step()
        opt.step()
        _zero(opt, ropt)
    all_ids = torch.arange(N)
    got, want = emb.lookup(all_ids), ref.weight.detach()
    t = torch.tensor(sorted(touched))
    torch.testing.assert_close(got[t], want[t], **TOL)
    assert not torch.equal(got[t], init[t])
    untouched = torch.tensor(sorted(set(range(N)) - touched))
    assert torch.equal(got[untouched], init[untouched])  # lazy: never-seen rows keep their initial value
    assert emb.num_rows == len(touched) and emb.step_count == STEPS
    return emb


@pytest.mark.parametrize("betas,maximize", [((0.9, 0.999), False), ((0.5, 0.9), True)])
def test_adam_is_lazy_adam_like_sparse_adam(betas, maximize):
    emb = _sparse_parity(lambda p: fastps.optim.Adam(p, lr=0.01, betas=betas, maximize=maximize),
                         lambda p: torch.optim.SparseAdam(p, lr=0.01, betas=betas, maximize=maximize))
    assert emb.rule == "SPARSE_ADAM"


def test_adamw_without_weight_decay_is_lazy_adam():
    _sparse_parity(lambda p: fastps.optim.AdamW(p, lr=0.01, weight_decay=0.0),
                   lambda p: torch.optim.SparseAdam(p, lr=0.01))


@pytest.mark.parametrize("lr_decay,init_acc", [(0.0, 0.0), (0.01, 0.1)])
def test_adagrad_matches_torch_adagrad_on_sparse_grads(lr_decay, init_acc):
    kw = dict(lr=0.05, lr_decay=lr_decay, initial_accumulator_value=init_acc, eps=1e-10)
    emb = _sparse_parity(lambda p: fastps.optim.Adagrad(p, **kw), lambda p: torch.optim.Adagrad(p, **kw))
    assert emb.rule == "ADAGRAD"


def test_sgd_is_exact():
    """Dyadic gradients and lr make every sum and product exact, so the order of
    summation cannot matter: the rows must equal torch's bit for bit."""
    gen = torch.Generator().manual_seed(2)
    emb = fastps.nn.Embedding(D, num_embeddings=N)
    ref = nn.Embedding(N, D)
    with torch.no_grad():
        ref.weight.copy_(emb.lookup(torch.arange(N)))
    opt, ropt = fastps.optim.SGD(emb.parameters(), lr=0.25), torch.optim.SGD(ref.parameters(), lr=0.25)
    for _ in range(STEPS):
        ids = _batch(gen)
        g = torch.randint(-8, 9, (*ids.shape, D), generator=gen).float() / 64
        _step_pair(emb, ref, opt, ropt, (ids,), g)
    assert torch.equal(emb.lookup(torch.arange(N)), ref.weight.detach())


@pytest.mark.parametrize("mode,layout", [(m, lay) for m in ("sum", "mean", "max")
                                         for lay in ("2d", "offsets", "last_offset")] + [("sum", "weights")])
def test_embedding_bag_matches_torch(mode, layout):
    gen = torch.Generator().manual_seed(4)
    last = layout == "last_offset"
    bag = fastps.nn.EmbeddingBag(D, num_embeddings=N, mode=mode, include_last_offset=last)
    ref = nn.EmbeddingBag(N, D, mode=mode, include_last_offset=last)
    with torch.no_grad():
        ref.weight.copy_(bag.lookup(torch.arange(N)))
    opt, ropt = fastps.optim.SGD(bag.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(5):
        if layout == "2d":
            args = (_batch(gen, (5, 7)),)
        else:
            ids = _batch(gen, (20,))
            offsets = torch.tensor([0, 3, 3, 9, 16] + ([20] if last else []))  # one empty bag
            psw = torch.rand(20, generator=gen) if layout == "weights" else None
            args = (ids, offsets, psw)
        _step_pair(bag, ref, opt, ropt, args, lambda out: torch.randn(out.shape, generator=gen))
    torch.testing.assert_close(bag.lookup(torch.arange(N)), ref.weight.detach(), **TOL)


def test_padding_idx_reads_zero_and_never_trains():
    gen = torch.Generator().manual_seed(6)
    emb = fastps.nn.Embedding(D, num_embeddings=N, padding_idx=-1)  # normalised like torch: N - 1
    assert emb.padding_idx == N - 1
    ref = nn.Embedding(N, D, padding_idx=N - 1)
    with torch.no_grad():
        ref.weight.copy_(emb.lookup(torch.arange(N)))
    assert torch.equal(ref.weight[N - 1], torch.zeros(D))
    opt, ropt = fastps.optim.SGD(emb.parameters(), lr=0.25), torch.optim.SGD(ref.parameters(), lr=0.25)
    touched = set()
    for _ in range(3):
        ids = torch.cat([_batch(gen, (10,)), torch.tensor([N - 1, N - 1])])
        touched.update(ids[:10].tolist())
        g = torch.randint(-8, 9, (12, D), generator=gen).float() / 64
        _step_pair(emb, ref, opt, ropt, (ids,), g)
    assert torch.equal(emb.lookup(torch.arange(N)), ref.weight.detach())
    assert emb.num_rows == len(touched)  # the padding id never got a row
    bag = fastps.nn.EmbeddingBag(D, padding_idx=7, mode="mean")
    rbag = nn.EmbeddingBag(8, D, padding_idx=7, mode="mean")
    with torch.no_grad():
        rbag.weight.copy_(bag.lookup(torch.arange(8)))
    x = torch.tensor([[1, 7, 2], [7, 7, 3]])
    assert torch.equal(bag(x), rbag(x))


def test_rowwise_adagrad_matches_python_reference():
    gen = torch.Generator().manual_seed(7)
    lr, eps = 0.1, 1e-8
    emb = fastps.nn.Embedding(D, optimizer="rowwise_adagrad")
    opt = fastps.optim.SGD(emb.parameters(), lr=lr)  # the group gives lr; eps: the rule's default 1e-8
    ids_space = torch.tensor([-5, 0, 3, 10**12, 77])
    w = {i: emb.lookup(torch.tensor([i]))[0].clone() for i in ids_space.tolist()}
    acc = {i: torch.tensor(0.0) for i in w}
    for _ in range(10):
        ids = ids_space[torch.randint(0, 5, (9,), generator=gen)]
        g = torch.randn(9, D, generator=gen)
        emb(ids).backward(g)
        opt.step()
        opt.zero_grad()
        for i in set(ids.tolist()):
            gi = g[ids == i].sum(0)
            acc[i] = acc[i] + (gi * gi).sum() / D
            w[i] = w[i] - lr * gi / (acc[i].sqrt() + eps)
    for i, row in w.items():
        torch.testing.assert_close(emb.lookup(torch.tensor([i]))[0], row, rtol=1e-5, atol=1e-6)
    assert emb.rule == "ROWWISE_ADAGRAD" and emb.stats()["rows"] == 5


def test_model_with_embedding_and_dense_layers_trains_with_one_optimizer():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    emb = fastps.nn.Embedding(16, seed=1)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(16 * 3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = fastps.optim.Adam(model.parameters(), lr=0.02)
    ids = torch.randint(-1000, 1000, (64, 3), generator=gen)
    y = torch.randn(64, 1, generator=gen)
    dense0 = model[2].weight.detach().clone()
    rows0 = emb.lookup(ids)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(ids), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model[2].weight, dense0)
    assert not torch.equal(emb.lookup(ids), rows0)
    assert emb.rule == "SPARSE_ADAM" and emb.step_count == 40
    assert emb.sparse_handle not in opt.state  # the dense path skips the handle


def test_lr_scheduler_and_param_group_lr_apply_to_rows():
    emb = fastps.nn.Embedding(4)
    lin = nn.Linear(4, 1)
    opt = fastps.optim.SGD([{"params": lin.parameters()}, {"params": emb.parameters(), "lr": 0.5}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ids = torch.tensor([9])
    g = torch.tensor([[1.0, -2.0, 0.5, 0.25]])
    w = emb.lookup(ids)
    for lr in (0.5, 0.25, 0.125):
        emb(ids).backward(g)
        opt.step()
        opt.zero_grad()
        sched.step()
        w = w - lr * g
        assert torch.equal(emb.lookup(ids), w)


def test_gradient_accumulation_sums_like_one_concatenated_batch():
    """Dyadic gradients: every per-id sum is exact, so accumulating (a sum of two
    deduplicated sums) must give the bits of one pass over the concatenated batch.
    With arbitrary floats the two differ by summation order only (about 1 ulp)."""
    gen = torch.Generator().manual_seed(9)
    a, b = fastps.nn.Embedding(D, seed=4), fastps.nn.Embedding(D, seed=4)
    oa, ob = fastps.optim.Adam(a.parameters(), lr=0.01), fastps.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(4):
        x1, x2 = _batch(gen, (30,), high=20), _batch(gen, (25,), high=20)
        g1 = torch.randint(-64, 65, (30, D), generator=gen).float() / 32
        g2 = torch.randint(-64, 65, (25, D), generator=gen).float() / 32
        a(x1).backward(g1)
        a(x2).backward(g2)  # a second backward before the step: accumulates
        b(torch.cat([x1, x2])).backward(torch.cat([g1, g2]))
        oa.step()
        ob.step()
        _zero(oa, ob)
    ids = torch.arange(20)
    assert torch.equal(a.lookup(ids), b.lookup(ids))
    assert a.step_count == b.step_count == 4
    # The same module called twice in one graph sums too.
    c = fastps.nn.Embedding(D, seed=4)
    oc = fastps.optim.SGD(c.parameters(), lr=0.1)
    (c(torch.tensor([1, 2])).sum() + c(torch.tensor([2, 3])).sum()).backward()
    oc.step()
    base = fastps.nn.Embedding(D, seed=4).lookup(torch.tensor([1, 2, 3]))
    torch.testing.assert_close(c.lookup(torch.tensor([1, 2, 3])) - base,
                               torch.tensor([[-0.1], [-0.2], [-0.1]]).expand(3, D), rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", ["zipf", "extremes", "one", "empty", "collide"])
def test_worker_side_unique_gather_and_segment_sum(case):
    """The C++ ops behind forward and backward (Note [Worker-side embedding ops]):
    unique ids in order of first appearance (or sorted, equal to np.unique), the
    gather equal to index_select, and the segment sum equal bit for bit to a
    sequential index_add_ into zeros (same order of adds, -0.0 gradients included)."""
    import numpy as np

    from fastps.nn.embedding import _dedup, _gather, _segment_sum

    gen = torch.Generator().manual_seed(11)
    ids = {
        "zipf": (torch.rand(3000, generator=gen) ** 4 * 500).long() - 250,
        "extremes": torch.tensor([2**63 - 1, -2**63, 0, -1, 2**63 - 1, 1, -2**63, 2**40, -1]),
        "one": torch.tensor([[7, 7], [7, 7]]),
        "empty": torch.zeros(0, 3, dtype=torch.long),
        "collide": torch.arange(600) << 52,  # equal low bits: only a mixed hash spreads them
    }[case]
    flat = ids.reshape(-1)
    u, inv, lo, hi = _dedup(ids)
    assert inv.shape == ids.shape and torch.equal(u[inv], ids)
    assert len(set(u.tolist())) == u.numel() == len(set(flat.tolist()))
    first = [flat.tolist().index(v) for v in u.tolist()]
    assert first == sorted(first)  # order of first appearance
    if flat.numel():
        assert (lo, hi) == (int(flat.min()), int(flat.max()))
    su, sinv, _, _ = _dedup(ids, sort=True)
    nu, ninv = np.unique(flat.numpy(), return_inverse=True)
    assert su.tolist() == nu.tolist() and sinv.reshape(-1).tolist() == ninv.tolist()

    rows = torch.randn(u.numel(), 5, generator=gen)
    assert torch.equal(_gather(rows, inv), rows[inv])
    grads = torch.randn(*ids.shape, 5, generator=gen)
    grads.view(-1)[::7] = -0.0
    want = torch.zeros(u.numel(), 5).index_add_(0, inv.reshape(-1), grads.reshape(-1, 5))
    got = _segment_sum(grads, inv, u.numel())
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    # Non-contiguous and float64 gradients are converted, not misread.
    g64 = grads.double().transpose(0, -1).contiguous().transpose(0, -1)
    assert torch.equal(_segment_sum(g64, inv, u.numel()), want)


@pytest.mark.parametrize("kw", [{}, dict(eviction="ttl", ttl_steps=1, max_rows=100)])
def test_pull_straight_into_the_output_equals_pull_then_gather(kw):
    """The embedded table writes each unique row to all its positions in the output
    (pull_scatter); it must equal pulling the unique rows and gathering them, for
    rows with values, rows read as initial values, and (TTL) rows expiring on lookup."""
    from fastps.nn.embedding import _dedup, _gather

    emb = fastps.nn.Embedding(5, seed=3, **kw)
    opt = fastps.optim.SGD(emb.parameters(), lr=0.5)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    for _ in range(3 if kw else 0):  # TTL: age rows 1-3 past their ttl
        emb(torch.tensor([40])).sum().backward()
        opt.step()
    ids = torch.tensor([[3, 9, 3, 1], [7, 7, 2, 9]])
    uids, inverse, _, _ = _dedup(ids)
    want = _gather(emb._pull(uids, None), inverse)
    got = emb._lookup_rows(uids, inverse, None)
    assert got.shape == (2, 4, 5) and torch.equal(got, want)
    assert torch.equal(emb(ids), want)


def test_gradient_penalty_with_create_graph_over_all_parameters():
    """torch.autograd.grad(..., create_graph=True) over model.parameters() (a gradient
    penalty) differentiates the handle's constant gradient again: that must work, and
    the rows' gradients of both passes are stashed for the step."""
    for emb in (fastps.nn.Embedding(4, seed=1), fastps.nn.EmbeddingBag(4, mode="sum", seed=1)):
        lin = nn.Linear(4, 1)
        model = nn.Sequential(emb, lin)
        ids = torch.tensor([[1, 2, 2]]) if isinstance(emb, fastps.nn.EmbeddingBag) else torch.tensor([1, 2, 2])
        loss = model(ids).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        assert grads[0].numel() == 0  # the handle's
        sum(g.pow(2).sum() for g in grads).backward()
        assert lin.weight.grad is not None and len(emb._pending) == 2  # both passes stashed
        opt = fastps.optim.SGD(model.parameters(), lr=0.1)
        before = emb.lookup(torch.tensor([1, 2]))
        opt.step()
        assert not torch.equal(emb.lookup(torch.tensor([1, 2])), before)


@pytest.mark.parametrize("kw", [dict(max_rows=12, eviction="lru"), dict(max_rows=12, eviction="lfu"),
                                dict(admit_threshold=2, max_pending=6)])
def test_eviction_and_admission_do_not_depend_on_the_order_of_ids_in_a_batch(kw):
    """Under eviction or admission, which rows are created, evicted or admitted
    depends on the order of the ids the table is given: the module sorts them
    then, so a batch and its reversal train identically."""
    gen = torch.Generator().manual_seed(8)
    a, b = fastps.nn.Embedding(D, seed=2, **kw), fastps.nn.Embedding(D, seed=2, **kw)
    oa, ob = fastps.optim.Adagrad(a.parameters(), lr=0.1), fastps.optim.Adagrad(b.parameters(), lr=0.1)
    for _ in range(12):
        ids = torch.randint(0, 30, (25,), generator=gen)
        g = torch.randn(25, D, generator=gen)
        a(ids).backward(g)
        b(ids.flip(0)).backward(g.flip(0))
        oa.step()
        ob.step()
        _zero(oa, ob)
    every = torch.arange(30)
    assert a.stats()["admitted"] == b.stats()["admitted"] and a.stats()["evicted"] == b.stats()["evicted"]
    torch.testing.assert_close(a.lookup(every), b.lookup(every), rtol=1e-6, atol=1e-6)


def test_bad_ids_raise_type_error_and_out_of_range_index_error():
    emb = fastps.nn.Embedding(4, num_embeddings=10)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True]), torch.tensor([1], dtype=torch.int16), [1, 2]):
        with pytest.raises(TypeError, match="int64"):
            emb(bad)
    assert emb(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 4)  # int32 is fine, as in torch
    for bad in ([10], [-1], [3, 10**12]):
        with pytest.raises(IndexError, match="out of range"):
            emb(torch.tensor(bad))
    with pytest.raises(IndexError):
        emb.lookup(torch.tensor([10]))
    with pytest.raises(InvalidArgumentError):
        fastps.nn.Embedding(0)
    with pytest.raises(InvalidArgumentError):
        fastps.nn.Embedding(4, eviction="fifo")
    with pytest.raises(InvalidArgumentError):
        fastps.nn.Embedding(4, eviction="ttl")  # needs ttl_steps >= 1 (the native table says so)
    with pytest.raises(InvalidArgumentError):
        fastps.nn.Embedding(4, optimizer="lamb")
    with pytest.raises(AttributeError, match="lookup"):
        emb.weight


def test_shapes_and_empty_batches():
    emb = fastps.nn.Embedding(3)
    assert emb(torch.tensor(5)).shape == (3,)
    assert emb(torch.zeros(2, 0, 4, dtype=torch.long)).shape == (2, 0, 4, 3)
    bag = fastps.nn.EmbeddingBag(3, mode="sum")
    out = bag(torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(2, 3))


def test_full_table_without_eviction_raises_and_stays_usable():
    emb = fastps.nn.Embedding(4, max_rows=8)
    opt = fastps.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.arange(20)).sum().backward()
    with pytest.raises(fastps.CapacityError, match="max_rows"):
        opt.step()
    assert emb.num_rows == 0
    emb.discard_pending_grads()
    opt.zero_grad()
    emb(torch.arange(5)).sum().backward()
    opt.step()
    assert emb.num_rows == 5
    lru = fastps.nn.Embedding(4, max_rows=8, eviction="lru")
    opt = fastps.optim.SGD(lru.parameters(), lr=0.1)
    for s in range(3):
        lru(torch.arange(10 * s, 10 * s + 10)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert lru.num_rows <= 8 and lru.stats()["evicted"] > 0


def test_unbounded_negative_and_huge_ids():
    ids = torch.tensor([-(2**63), 2**63 - 1, -1, 0, 2**40, -(2**40)])
    emb = fastps.nn.Embedding(8)
    before = emb.lookup(ids)
    assert len(set(map(tuple, before.tolist()))) == len(ids)  # distinct ids, distinct initial rows
    opt = fastps.optim.Adagrad(emb.parameters(), lr=0.1)
    emb(ids).pow(2).sum().backward()
    opt.step()
    after = emb.lookup(ids)
    assert (after != before).all(dim=1).all()
    assert emb.num_rows == len(ids)


def _train(model, opt, gen, steps, dim):
    for _ in range(steps):
        x = torch.randint(-50, 50, (8, 5), generator=gen)
        loss = (model(x) * torch.randn(8, 5, dim, generator=gen)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(3)
    a = fastps.nn.Embedding(D, seed=1, admit_threshold=2, max_rows=1000, eviction="lfu")
    oa = fastps.optim.Adam(a.parameters(), lr=0.01)
    _train(a, oa, gen, 6, D)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the table travels as a uint8 tensor
    b = fastps.nn.Embedding(D, seed=99, admit_threshold=2, max_rows=1000, eviction="lfu")  # other seed: replaced
    b.load_state_dict(ckpt["model"])
    ob = fastps.optim.Adam(b.parameters(), lr=0.01)
    ob.load_state_dict(ckpt["opt"])
    ids = torch.arange(-60, 60)
    assert torch.equal(a.lookup(ids), b.lookup(ids))
    sa, sb = a.stats(), b.stats()
    for k in ("rows", "pending", "step", "rule"):
        assert sa[k] == sb[k], k
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    _train(a, oa, g1, 5, D)
    _train(b, ob, g2, 5, D)
    assert torch.equal(a.lookup(ids), b.lookup(ids))
    assert a.num_rows == b.num_rows and a.step_count == b.step_count == 11


def test_save_load_file_api_and_errors(tmp_path):
    gen = torch.Generator().manual_seed(4)
    a = fastps.nn.Embedding(8, init="zeros")
    oa = fastps.optim.Adagrad(a.parameters(), lr=0.1)
    _train(a, oa, gen, 3, 8)
    path = tmp_path / "emb.fpst"
    a.save(path)
    b = fastps.nn.Embedding(8)  # uniform init, SGD provisional table: the file's rule and init win
    b.load(path)
    ids = torch.arange(-60, 60)
    assert torch.equal(a.lookup(ids), b.lookup(ids)) and b.rule == "ADAGRAD"
    ob = fastps.optim.Adagrad(b.parameters(), lr=0.1)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _train(a, oa, g1, 2, 8)
    _train(b, ob, g2, 2, 8)
    assert torch.equal(a.lookup(ids), b.lookup(ids))
    # A corrupt file, another dim or another fixed rule raise and change nothing.
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    bad = tmp_path / "bad.fpst"
    bad.write_bytes(bytes(data))
    before = b.lookup(ids)
    with pytest.raises(fastps.CheckpointError, match="corrupt"):
        b.load(bad)
    (tmp_path / "junk").write_bytes(b"not a table")
    with pytest.raises(FastPSError):
        b.load(tmp_path / "junk")
    with pytest.raises(InvalidArgumentError, match="dim"):
        fastps.nn.Embedding(4).load(path)
    with pytest.raises(InvalidArgumentError, match="ADAGRAD"):
        fastps.nn.Embedding(8, optimizer="adam").load(path)
    assert torch.equal(b.lookup(ids), before)
    # Pickling (torch.save of a whole module, copy.deepcopy) carries the table too.
    c = copy.deepcopy(b)
    assert torch.equal(c.lookup(ids), before) and c.rule == "ADAGRAD"


def test_misuse_and_rule_errors_are_clear():
    emb = fastps.nn.Embedding(4)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)  # torch.optim cannot see the rows
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(FastPSError, match="fastps.optim"):
        emb(torch.tensor([1, 2]))
    emb.discard_pending_grads()
    emb(torch.tensor([1, 2]))

    # Weight decay, momentum and amsgrad have no sparse rule: raise before any update.
    model = nn.Sequential(fastps.nn.Embedding(4), nn.Linear(4, 1))
    for opt in (fastps.optim.AdamW(model.parameters()),  # weight_decay=1e-2 by default
                fastps.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                fastps.optim.Adam(model.parameters(), amsgrad=True)):
        dense = model[1].weight.detach().clone()
        model(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(ValueError, match="weight_decay|momentum|amsgrad"):
            opt.step()
        assert torch.equal(model[1].weight, dense) and model[0].num_rows == 0
        opt.zero_grad()
        model[0].discard_pending_grads()
    # The documented fix: the embedding in its own group without weight decay.
    opt = fastps.optim.AdamW([{"params": model[1].parameters()},
                              {"params": model[0].parameters(), "weight_decay": 0.0}])
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert model[0].num_rows == 2

    # Once trained, the table's rule is fixed.
    with pytest.raises(ValueError, match="SPARSE_ADAM"):
        other = fastps.optim.Adagrad(model[0].parameters())
        model(torch.tensor([1, 2])).sum().backward()
        other.step()


def test_explicit_sparse_optim_and_ftrl_group_keys():
    rule = fastps.nn.SparseOptim(fastps.nn.SparseRule.SGD, lr=1.0)  # public, as docs/sparse.md shows
    emb = fastps.nn.Embedding(2, optimizer=rule, init="zeros")
    opt = fastps.optim.Adam(emb.parameters(), lr=123.0, weight_decay=0.1)  # group ignored
    emb(torch.tensor([4])).backward(torch.tensor([[1.0, -1.0]]))
    opt.step()
    assert torch.equal(emb.lookup(torch.tensor([4])), torch.tensor([[-1.0, 1.0]]))
    ftrl = fastps.nn.Embedding(2, optimizer="ftrl", init="zeros")
    opt = fastps.optim.SGD([{"params": ftrl.parameters(), "l1": 10.0}], lr=0.1)
    ftrl(torch.tensor([4])).backward(torch.tensor([[1.0, -1.0]]))
    opt.step()
    assert torch.equal(ftrl.lookup(torch.tensor([4])), torch.zeros(1, 2))  # |z| <= l1: exactly zero
    assert ftrl.rule == "FTRL"


def test_a_sparse_gradient_points_at_fastps_nn():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = fastps.optim.Adam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient.*fastps.nn.Embedding") as e:
        opt.step()
    assert "torch.optim.SparseAdam" not in str(e.value)
    assert "DistributedNotSupportedError" not in dir(fastps.nn)


def test_frozen_embedding_and_no_grad_forward():
    emb = fastps.nn.Embedding(4)
    with torch.no_grad():
        assert not emb(torch.tensor([1])).requires_grad
    emb.requires_grad_(False)
    assert not emb(torch.tensor([1])).requires_grad


def test_distributed_mode_without_a_rendezvous_explains(monkeypatch):
    # Multi-process training is tested in tests/test_nn_distributed.py.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(fastps.InvalidArgumentError, match="torchrun") as e:
        fastps.nn.Embedding(4)
    assert isinstance(e.value, FastPSError)
