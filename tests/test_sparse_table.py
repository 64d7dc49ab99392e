"""The server-side sparse embedding table (csrc/table/sparse_table.h) through _C.SparseTable.

Contract (docs/sparse.md):
  * an id without a row reads as its initial value, a pure function of
    (seed, id, element): the same for any shard count and arrival order;
    pulls never create rows;
  * Adagrad equals torch.optim.Adagrad and lazy Adam torch.optim.SparseAdam on
    an nn.Embedding(sparse=True) to rtol 1e-6 over 20 steps; the only
    difference is torch's vectorised sqrt (not always correctly rounded): with
    a correctly rounded sqrt, torch's op sequence gives our bits exactly;
  * the AVX2+FMA and generic kernels give the same bits;
  * admission, eviction and the row cap behave as documented; a full table
    with eviction off raises and stays usable;
  * save/load round-trips exactly (across shard counts); a corrupt, truncated
    or mismatched file raises and leaves the live table untouched.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastps.errors
from fastps import _C

R = _C.SparseRule
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXTREME_IDS = [0, 1, -1, 2, -2, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 2**32, -(2**32)]


# ---------------------------------------------------------------- helpers

def make(shards: int = 2, dim: int = 8, **kw) -> _C.SparseTable:
    return _C.SparseTable(_C.Server(shards), dim, **kw)


def as_ids(ids) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.int64).contiguous()


def pull(t: _C.SparseTable, ids) -> torch.Tensor:
    ids = as_ids(ids)
    out = torch.empty(len(ids), t.dim)
    t.pull(ids.data_ptr(), len(ids), out.data_ptr(), out.numel())
    return out


def push(t: _C.SparseTable, ids, grads: torch.Tensor, rule: _C.SparseOptim, step: int) -> None:
    ids = as_ids(ids)
    grads = grads.contiguous()
    assert grads.dtype == torch.float32 and grads.shape == (len(ids), t.dim)
    t.push(ids.data_ptr(), len(ids), grads.data_ptr(), grads.numel(), rule, step)


M64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _unit(h: int) -> float:
    return (h >> 11) * 2.0**-53


def ref_init(seed: int, ids, dim: int, kind: str = "uniform", a: float = -0.05, b: float = 0.05):
    """Python transcription of sparse_init_values (docs/sparse.md "Initial values")."""
    rows = []
    for i in ids:
        if kind == "zeros":
            rows.append([0.0] * dim)
            continue
        base = _mix((i & M64) ^ _mix((seed + GOLDEN) & M64))
        h = lambda j: _mix((base + j * GOLDEN) & M64)  # noqa: E731
        if kind == "uniform":
            rows.append([a + (b - a) * _unit(h(j + 1)) for j in range(dim)])
        else:
            row = []
            for j in range(dim):
                u1 = 1.0 - _unit(h(2 * j + 1))
                u2 = _unit(h(2 * j + 2))
                row.append(a + b * (math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)))
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)  # float64 -> float32: round to nearest, as C++


def unique_ids(n: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(pool, generator=gen)[:n].sort().values


# ---------------------------------------------------------------- initial values

@pytest.mark.parametrize("kind,a,b", [("uniform", -0.05, 0.05), ("uniform", 1.0, 3.0),
                                      ("normal", 0.0, 1.0), ("normal", 0.5, 0.01), ("zeros", 0.0, 0.0)])
@pytest.mark.parametrize("dim", [13, 64])  # 64: whole AVX-512 vectors where the CPU has them; 13: a tail
def test_unseen_ids_read_initial_values_without_rows(kind, a, b, dim):
    init = {"uniform": _C.SparseInit.UNIFORM, "normal": _C.SparseInit.NORMAL,
            "zeros": _C.SparseInit.ZEROS}[kind]
    t = make(3, dim=dim, seed=42, init=init, init_a=a, init_b=b)
    ids = EXTREME_IDS + list(range(100, 140))
    got = pull(t, ids)
    torch.testing.assert_close(got, ref_init(42, ids, dim, kind, a, b), rtol=0, atol=0)
    assert len(t) == 0 and t.stats()["rows"] == 0 and t.stats()["admitted"] == 0
    assert torch.equal(pull(t, ids), got)  # pulling again changes nothing
    if kind == "uniform":
        assert got.min() >= a and got.max() <= b
    if kind == "normal" and b == 1.0:
        big = pull(t, list(range(2000)))
        assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1.0) < 0.02


@pytest.mark.parametrize("init", [_C.SparseInit.UNIFORM, _C.SparseInit.NORMAL])
def test_initial_values_independent_of_shards_and_order(init):
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([as_ids(EXTREME_IDS), torch.randint(INT64_MIN, INT64_MAX, (300,), generator=gen)])
    ref = pull(make(1, dim=6, seed=7, init=init, init_a=0.0, init_b=0.3), ids)
    for shards in (1, 2, 3):
        t = make(shards, dim=6, seed=7, init=init, init_a=0.0, init_b=0.3)
        perm = torch.randperm(len(ids), generator=gen)
        got = pull(t, ids[perm])
        assert torch.equal(got, ref[perm])
    other_seed = pull(make(2, dim=6, seed=8, init=init, init_a=0.0, init_b=0.3), ids)
    assert not torch.equal(other_seed, ref)


# ---------------------------------------------------------------- rows, ids and SGD

def test_sgd_update_and_extreme_ids():
    t = make(3, dim=5, seed=3)
    ids = EXTREME_IDS
    g = torch.randn(len(ids), 5)
    before = pull(t, ids)
    push(t, ids, g, _C.SparseOptim(R.SGD, lr=0.1), step=1)
    assert len(t) == len(ids)
    expected = torch.addcmul(before, g, torch.full_like(g, -0.1))  # w - lr*g, as w.add_(g, alpha=-lr)
    torch.testing.assert_close(pull(t, ids), expected, rtol=1e-6, atol=0)
    # an id that was never pushed still reads as its initial value
    assert torch.equal(pull(t, [12345]), ref_init(3, [12345], 5))


def test_many_ids_grow_the_index():
    gen = torch.Generator().manual_seed(2)
    t = make(2, dim=4, seed=5)
    ids = torch.unique(torch.randint(INT64_MIN, INT64_MAX, (20000,), generator=gen))
    ids = torch.cat([ids, as_ids(EXTREME_IDS)]).unique()
    g = torch.randn(len(ids), 4, generator=gen)
    before = pull(t, ids)
    push(t, ids, g, _C.SparseOptim(R.SGD, lr=1.0), step=1)
    assert len(t) == len(ids)
    perm = torch.randperm(len(ids), generator=gen)
    torch.testing.assert_close(pull(t, ids[perm]), (before - g)[perm], rtol=1e-6, atol=1e-7)
    st = t.stats()
    assert st["rows"] == len(ids) and st["admitted"] == len(ids)
    assert st["memory_bytes"] >= len(ids) * (32 + 16)


def test_repeated_id_in_one_push_gets_one_row():
    """Ids of a push should be unique (fastps.nn deduplicates); a repeated one must
    still map to a single row, updated once per occurrence, also when the push's
    first pass looked every id up before any row was created."""
    t = make(2, dim=4, seed=1)
    before = pull(t, [5, 9])
    push(t, [5, 9, 5], torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4]), _C.SparseOptim(R.SGD, lr=1.0), step=1)
    assert len(t) == 2 and t.stats()["admitted"] == 2
    torch.testing.assert_close(pull(t, [5, 9]), before - torch.tensor([[4.0] * 4, [2.0] * 4]))


def test_push_checks_rule_and_arguments():
    t = make(2, dim=4, rule=R.ADAGRAD)
    with pytest.raises(fastps.errors.InvalidArgumentError, match="rule"):
        push(t, [1], torch.ones(1, 4), _C.SparseOptim(R.SGD), step=1)
    with pytest.raises(fastps.errors.InvalidArgumentError, match="step"):
        push(t, [1], torch.ones(1, 4), _C.SparseOptim(R.ADAGRAD), step=0)
    with pytest.raises(fastps.errors.InvalidArgumentError):
        _C.SparseOptim(R.SPARSE_ADAM, beta1=1.0)
    with pytest.raises(fastps.errors.InvalidArgumentError):
        make(2, dim=0)
    with pytest.raises(fastps.errors.InvalidArgumentError):
        make(2, dim=4, eviction=_C.SparseEviction.TTL)  # needs ttl_steps
    assert len(t) == 0


# ---------------------------------------------------------------- parity with torch.optim

NUM, DIM, STEPS = 64, 32, 20  # DIM: a multiple of every vector width (torch's tail loop may differ)


def _torch_vs_fastps(rule: _C.SparseOptim, make_opt, *, shards: int, table_rule, dim: int = DIM,
                     rtol: float = 1e-6, num: int = NUM, batch: int = NUM // 3, steps: int = STEPS):
    gen = torch.Generator().manual_seed(11)
    table_ids = (torch.arange(num) * 1_000_003 - 31_000_000_000).to(torch.int64)  # negative and large
    t = make(shards, dim=dim, seed=9, rule=table_rule, init=_C.SparseInit.NORMAL, init_a=0.0, init_b=0.5)
    emb = torch.nn.Embedding(num, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(pull(t, table_ids))
    opt = make_opt(emb.parameters())
    for step in range(1, steps + 1):
        idx = unique_ids(batch, num, gen)
        g = torch.randn(len(idx), dim, generator=gen)
        opt.zero_grad()
        # Opting in explicitly keeps torch from warning that the checks are off.
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            (emb(idx) * g).sum().backward()
            opt.step()
        push(t, table_ids[idx], g, rule, step)
        torch.testing.assert_close(pull(t, table_ids), emb.weight.detach(), rtol=rtol, atol=1e-7)
    assert len(t) <= num
    return t


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("lr_decay,init_acc,maximize", [(0.0, 0.0, False), (0.01, 0.1, False),
                                                        (0.0, 0.0, True)])
def test_adagrad_matches_torch(shards, lr_decay, init_acc, maximize):
    rule = _C.SparseOptim(R.ADAGRAD, lr=0.05, eps=1e-10, lr_decay=lr_decay,
                          initial_accumulator_value=init_acc, maximize=maximize)
    _torch_vs_fastps(rule, lambda p: torch.optim.Adagrad(p, lr=0.05, eps=1e-10, lr_decay=lr_decay,
                                                         initial_accumulator_value=init_acc,
                                                         maximize=maximize),
                     shards=shards, table_rule=R.ADAGRAD)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("betas,maximize", [((0.9, 0.999), False), ((0.5, 0.9), True)])
def test_lazy_adam_matches_sparse_adam(shards, betas, maximize):
    rule = _C.SparseOptim(R.SPARSE_ADAM, lr=0.01, eps=1e-8, beta1=betas[0], beta2=betas[1],
                          maximize=maximize)
    _torch_vs_fastps(rule, lambda p: torch.optim.SparseAdam(p, lr=0.01, betas=betas, eps=1e-8,
                                                            maximize=maximize),
                     shards=shards, table_rule=R.SPARSE_ADAM)


def test_large_table_grows_and_matches_sparse_adam():
    """Rows move when a shard's row mapping grows (mremap), and past 4 MiB the mapping
    asks for huge pages (Note [Mapped table memory]): values and optimizer state must
    come through every growth intact. 40k ids of dim 32 (416-byte rows, ~8 MiB per
    shard), pushed in batches that mostly create rows."""
    dim = 32
    t = _torch_vs_fastps(_C.SparseOptim(R.SPARSE_ADAM, lr=0.01, eps=1e-8),
                         lambda p: torch.optim.SparseAdam(p, lr=0.01, eps=1e-8), shards=2,
                         table_rule=R.SPARSE_ADAM, dim=dim, num=40_000, batch=12_000, steps=6)
    st = t.stats()
    row_bytes = 32 + 4 * 3 * dim
    # Reported memory: the rows' pages (up to a 2 MiB page per shard beyond them) and the index.
    assert st["rows"] * row_bytes <= st["memory_bytes"] <= st["rows"] * (row_bytes + 2 * 16 / 0.35) + 2 * (2 << 20)


def _exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.double().sqrt().float()  # correctly rounded float32 sqrt


def _fma(a: torch.Tensor, b: float, c: torch.Tensor) -> torch.Tensor:
    return (c.double() + a.double() * b).float()  # the product is exact in double


@pytest.mark.parametrize("rule_name", ["ADAGRAD", "SPARSE_ADAM"])
def test_rules_equal_torch_op_sequence_with_exact_sqrt(rule_name):
    """The only difference from torch is its sqrt: with a correctly rounded one, torch's
    op sequence (adagrad.py's sparse branch, functional.sparse_adam) gives our bits."""
    gen = torch.Generator().manual_seed(8)
    n, dim, lr, eps, b1, b2, lr_decay = 300, 24, 0.05, 1e-8, 0.9, 0.99, 0.01
    rule = _C.SparseOptim(getattr(R, rule_name), lr=lr, eps=eps, beta1=b1, beta2=b2, lr_decay=lr_decay)
    t = make(2, dim=dim, rule=getattr(R, rule_name), init=_C.SparseInit.NORMAL, init_a=0.0, init_b=1.0)
    ids = torch.arange(n) * 3 - 450
    w = pull(t, ids)
    s1 = torch.zeros(n, dim)
    s2 = torch.zeros(n, dim)
    for step in range(1, 16):
        idx = unique_ids(n // 2, n, gen)
        g = torch.randn(len(idx), dim, generator=gen)
        push(t, ids[idx], g, rule, step)
        if rule_name == "ADAGRAD":
            s1[idx] = s1[idx] + g * g
            std = _exact_sqrt(s1[idx]) + eps
            clr = lr / (1 + (step - 1) * lr_decay)
            w[idx] = _fma(g / std, float(torch.tensor(-clr, dtype=torch.float32)), w[idx])
        else:
            m_old, v_old = s1[idx], s2[idx]
            dm = (g - m_old) * (1 - b1)
            dv = (g * g - v_old) * (1 - b2)
            s1[idx], s2[idx] = m_old + dm, v_old + dv
            denom = _exact_sqrt(dv + v_old) + eps
            step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
            w[idx] = w[idx] + -step_size * ((dm + m_old) / denom)
        assert torch.equal(pull(t, ids), w), f"step {step}"


def _reference_rows(rule_name: str, steps: int, *, dim: int = 12, n: int = 20, **hyper):
    """Trains a 2-shard table and a float64 Python transcription of the formula side by side."""
    gen = torch.Generator().manual_seed(4)
    rule = _C.SparseOptim(getattr(R, rule_name), **hyper)
    t = make(2, dim=dim, seed=1, rule=getattr(R, rule_name))
    ids = torch.arange(n) - 7
    w = pull(t, ids).double()
    lr, eps = hyper.get("lr", 0.01), hyper.get("eps", 1e-8)
    acc = torch.full((n,), hyper.get("initial_accumulator_value", 0.0), dtype=torch.float64)
    m = torch.zeros(n, dim, dtype=torch.float64)
    v = torch.zeros(n, dim, dtype=torch.float64)
    z = torch.zeros(n, dim, dtype=torch.float64)
    nn_ = torch.full((n, dim), hyper.get("initial_accumulator_value", 0.0), dtype=torch.float64)
    row_steps = torch.zeros(n, dtype=torch.int64)
    for step in range(1, steps + 1):
        idx = unique_ids(n // 2, n, gen)
        g = torch.randn(len(idx), dim, generator=gen)
        push(t, ids[idx], g, rule, step)
        gd = g.double()
        row_steps[idx] += 1
        if rule_name == "ROWWISE_ADAGRAD":
            acc[idx] += (gd * gd).mean(dim=1)
            w[idx] -= lr * gd / (acc[idx].sqrt() + eps)[:, None]
        elif rule_name == "ROW_ADAM":
            b1, b2 = hyper["beta1"], hyper["beta2"]
            m[idx] += (gd - m[idx]) * (1 - b1)
            v[idx] += (gd * gd - v[idx]) * (1 - b2)
            k = row_steps[idx].double()[:, None]
            step_size = lr * torch.sqrt(1 - b2**k) / (1 - b1**k)
            w[idx] -= step_size * m[idx] / (v[idx].sqrt() + eps)
        elif rule_name == "FTRL":
            l1, l2, beta = hyper["l1"], hyper["l2"], hyper["ftrl_beta"]
            n_new = nn_[idx] + gd * gd
            sigma = (n_new.sqrt() - nn_[idx].sqrt()) / lr
            z[idx] += gd - sigma * w[idx]
            nn_[idx] = n_new
            quad = (n_new.sqrt() + beta) / lr + 2 * l2
            w_new = (torch.sign(z[idx]) * l1 - z[idx]) / quad
            w[idx] = torch.where(z[idx].abs() <= l1, torch.zeros_like(w_new), w_new)
    return pull(t, ids).double(), w


def test_rowwise_adagrad_matches_formula():
    got, ref = _reference_rows("ROWWISE_ADAGRAD", 20, lr=0.1, eps=1e-8, initial_accumulator_value=0.01)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_row_adam_matches_formula_and_differs_from_sparse_adam():
    got, ref = _reference_rows("ROW_ADAM", 20, lr=0.01, eps=1e-8, beta1=0.9, beta2=0.999)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # A row first pushed at table step 10: ROW_ADAM corrects with the row's own
    # step (a full first Adam step, ~lr), SPARSE_ADAM with the table's step.
    moves = {}
    for name in ("ROW_ADAM", "SPARSE_ADAM"):
        t = make(2, dim=4, rule=getattr(R, name))
        before = pull(t, [5])
        push(t, [5], torch.full((1, 4), 0.3), _C.SparseOptim(getattr(R, name), lr=0.01), step=10)
        moves[name] = (before - pull(t, [5])).abs().max().item()
    assert moves["ROW_ADAM"] == pytest.approx(0.01, rel=1e-3)
    b1, b2 = 0.9, 0.999
    sparse_adam_first = 0.01 * math.sqrt(1 - b2**10) / (1 - b1**10) * (1 - b1) / math.sqrt(1 - b2)
    assert moves["SPARSE_ADAM"] == pytest.approx(sparse_adam_first, rel=1e-3)  # ~0.48 lr here


def test_ftrl_matches_formula():
    got, ref = _reference_rows("FTRL", 15, lr=0.1, l1=0.05, l2=0.01, ftrl_beta=1.0,
                               initial_accumulator_value=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got == 0).any()  # l1 makes some weights exactly zero


@pytest.mark.parametrize("rule", [R.SGD, R.ADAGRAD, R.ROWWISE_ADAGRAD, R.SPARSE_ADAM, R.ROW_ADAM, R.FTRL])
def test_fast_kernels_equal_generic(rule):
    dim = 37  # vector body and scalar tail
    o = _C.SparseOptim(rule, lr=0.05, l1=0.01, ftrl_beta=0.5, initial_accumulator_value=0.1)
    nstate = _C.sparse_state_floats(rule, dim)
    outs = []
    for generic in (False, True):
        w = torch.randn(dim, generator=torch.Generator().manual_seed(5))
        s = torch.rand(max(nstate, 1), generator=torch.Generator().manual_seed(6))
        for step in range(1, 6):
            g = torch.randn(dim, generator=torch.Generator().manual_seed(step))
            _C.sparse_optim_update(o, step, step, w.data_ptr(), s.data_ptr(), g.data_ptr(), dim,
                                   generic=generic)
        outs.append((w, s))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------- admission and eviction

def test_admission_after_k_pushes():
    t = make(2, dim=4, seed=2, admit_threshold=3)
    sgd = _C.SparseOptim(R.SGD, lr=1.0)
    init = pull(t, [5, 6])
    for step in (1, 2):
        push(t, [5, 6], torch.ones(2, 4), sgd, step)
        assert len(t) == 0
        assert torch.equal(pull(t, [5, 6]), init)  # gradient dropped
    st = t.stats()
    assert st["rejected"] == 4 and st["pending"] == 2 and st["admitted"] == 0
    push(t, [5], torch.full((1, 4), 2.0), sgd, 3)  # 3rd push of id 5 creates the row
    assert len(t) == 1
    torch.testing.assert_close(pull(t, [5, 6]), torch.stack([init[0] - 2.0, init[1]]))
    st = t.stats()
    assert st["admitted"] == 1 and st["pending"] == 1 and st["rejected"] == 4
    push(t, [5], torch.ones(1, 4), sgd, 4)  # an admitted row takes every push
    torch.testing.assert_close(pull(t, [5]), init[:1] - 3.0)


def test_pending_admission_counts_are_bounded():
    t = make(1, dim=2, admit_threshold=2, max_pending=64)
    push(t, torch.arange(1000), torch.ones(1000, 2), _C.SparseOptim(R.SGD), 1)
    st = t.stats()
    assert st["pending"] <= 64 and st["rows"] == 0 and st["rejected"] == 1000


def test_lru_keeps_recently_used():
    t = make(1, dim=4, max_rows=8, eviction=_C.SparseEviction.LRU, eviction_samples=64)
    sgd = _C.SparseOptim(R.SGD, lr=0.1)
    push(t, range(8), torch.ones(8, 4), sgd, 1)
    for step in range(2, 5):
        push(t, range(4), torch.ones(4, 4), sgd, step)  # 0..3 recently used
    hot = pull(t, range(4))
    push(t, range(100, 104), torch.ones(4, 4), sgd, 5)  # 4 new rows must evict 4
    st = t.stats()
    assert len(t) == 8 and st["evicted"] == 4 and st["admitted"] == 12
    assert torch.equal(pull(t, range(4)), hot)  # the recently used rows survived
    # the evicted ids read as their initial value again
    assert torch.equal(pull(t, range(4, 8)), ref_init(0, range(4, 8), 4))


def test_eviction_respects_cap_on_several_shards():
    for policy in (_C.SparseEviction.LRU, _C.SparseEviction.LFU):
        t = make(3, dim=4, max_rows=30, eviction=policy)
        for step in range(1, 21):
            push(t, torch.arange(step * 10, step * 10 + 10), torch.ones(10, 4), _C.SparseOptim(R.SGD), step)
            assert len(t) <= 30
        st = t.stats()
        assert st["admitted"] == 200 and st["evicted"] == 200 - st["rows"]


def test_lfu_keeps_frequently_used():
    t = make(1, dim=2, max_rows=10, eviction=_C.SparseEviction.LFU, eviction_samples=64)
    sgd = _C.SparseOptim(R.SGD)
    for step in range(1, 6):
        push(t, range(5), torch.ones(5, 2), sgd, step)  # 0..4: 5 accesses each
    push(t, range(5, 10), torch.ones(5, 2), sgd, 6)    # 5..9: 1 access, most recent
    hot = pull(t, range(5))
    push(t, range(20, 25), torch.ones(5, 2), sgd, 7)
    assert torch.equal(pull(t, range(5)), hot)
    assert len(t) == 10 and t.stats()["evicted"] == 5


@pytest.mark.parametrize("half_life", [0, 2])
def test_lfu_counts_decay_with_a_half_life(half_life):
    """Rows 0..4 were hot long ago (20 accesses, none in the last 11 steps), rows 5..9
    are lukewarm and recent (2 accesses). Without decay LFU keeps the old hot rows; with
    a half-life of 2 steps their counts are 20 >> 5 = 0 and they go instead."""
    t = make(1, dim=2, max_rows=10, eviction=_C.SparseEviction.LFU, eviction_samples=64, ttl_steps=half_life)
    sgd = _C.SparseOptim(R.SGD)
    for step in range(1, 21):
        push(t, range(5), torch.ones(5, 2), sgd, step)
    push(t, range(5, 10), torch.ones(5, 2), sgd, 21)
    push(t, range(5, 10), torch.ones(5, 2), sgd, 30)
    push(t, range(20, 25), torch.ones(5, 2), sgd, 31)  # needs 5 victims
    st = t.stats()
    assert len(t) == 10 and st["evicted"] == 5
    old_evicted = torch.equal(pull(t, range(5)), pull(make(1, dim=2), range(5)))  # initial values again
    assert old_evicted == (half_life != 0)


def test_ttl_expires_idle_rows():
    t = make(2, dim=2, eviction=_C.SparseEviction.TTL, ttl_steps=2)
    sgd = _C.SparseOptim(R.SGD, lr=1.0)
    push(t, [1, 2], torch.ones(2, 2), sgd, 1)
    for step in range(2, 6):
        push(t, [2], torch.ones(1, 2), sgd, step)  # id 1 idle since step 1
    assert torch.equal(pull(t, [1]), ref_init(0, [1], 2))  # expired: initial value again
    assert t.stats()["expired"] == 1 and len(t) == 1
    torch.testing.assert_close(pull(t, [2]), ref_init(0, [2], 2) - 5.0)


def test_full_table_without_eviction_raises_and_stays_usable():
    t = make(2, dim=4, max_rows=4)  # 2 rows per shard
    sgd = _C.SparseOptim(R.SGD, lr=1.0)
    by_shard = {0: [], 1: []}
    for i in range(100):
        by_shard[t.shard_of(i)].append(i)
    ids = by_shard[0][:2] + by_shard[1][:2]
    with pytest.raises(fastps.CapacityError, match="max_rows.*eviction"):
        push(t, by_shard[0][:3] + by_shard[1][:1], torch.ones(4, 4), sgd, 1)
    assert len(t) == 0  # nothing changed, on either shard
    push(t, ids, torch.ones(4, 4), sgd, 1)
    assert len(t) == 4
    before = pull(t, ids)
    with pytest.raises(fastps.CapacityError, match="Raise max_rows"):
        push(t, [ids[0], by_shard[1][2]], torch.ones(2, 4), sgd, 2)
    assert len(t) == 4 and torch.equal(pull(t, ids), before)  # the fitting row was not updated either
    push(t, ids, torch.ones(4, 4), sgd, 2)  # existing rows still train
    torch.testing.assert_close(pull(t, ids), before - 1.0)


# ---------------------------------------------------------------- save / load

def _train(t, steps, rule, *, first_step=1, seed=0, pool=200, n=40):
    gen = torch.Generator().manual_seed(seed)
    for step in range(first_step, first_step + steps):
        idx = unique_ids(n, pool, gen) * 7919 - 500_000
        push(t, idx, torch.randn(len(idx), t.dim, generator=gen), rule, step)


@pytest.mark.parametrize("rule_name", ["SPARSE_ADAM", "ROW_ADAM", "ADAGRAD"])
def test_save_load_continues_exactly(tmp_path, rule_name):
    kw = dict(dim=8, seed=4, rule=getattr(R, rule_name), admit_threshold=2)
    rule = _C.SparseOptim(getattr(R, rule_name), lr=0.01)
    path = str(tmp_path / "table.fps")
    a = make(2, **kw)
    _train(a, 10, rule, seed=1)
    a.save(path)
    assert os.listdir(tmp_path) == ["table.fps"]  # no temp file left behind
    _train(a, 10, rule, first_step=11, seed=2)

    b = make(3, **kw)  # another shard count: rows are re-routed on load
    b.load(path)
    assert b.step == 10
    _train(b, 10, rule, first_step=11, seed=2)
    ids = torch.arange(200) * 7919 - 500_000
    assert torch.equal(pull(a, ids), pull(b, ids))
    sa, sb = a.stats(), b.stats()
    assert sa["rows"] == sb["rows"] and sa["pending"] == sb["pending"]


def test_load_rejects_corrupt_truncated_and_mismatched_files(tmp_path):
    rule = _C.SparseOptim(R.SPARSE_ADAM, lr=0.01)
    src = make(2, dim=8, seed=4, rule=R.SPARSE_ADAM)
    _train(src, 5, rule)
    path = tmp_path / "good.fps"
    src.save(str(path))
    data = path.read_bytes()

    live = make(3, dim=8, seed=4, rule=R.SPARSE_ADAM)
    _train(live, 3, rule, seed=9)
    ids = torch.arange(200) * 7919 - 500_000
    before, size_before, step_before = pull(live, ids), len(live), live.step

    def rejected(blob: bytes, err=fastps.CheckpointError, match=None):
        bad = tmp_path / "bad.fps"
        bad.write_bytes(blob)
        with pytest.raises(err, match=match):
            live.load(str(bad))
        assert len(live) == size_before and live.step == step_before
        assert torch.equal(pull(live, ids), before)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    rejected(bytes(flipped), match="corrupt")
    header_flip = bytearray(data)
    header_flip[56] ^= 0x01  # inside the seed field: corrupt, not a mismatch
    rejected(bytes(header_flip), match="corrupt")
    rejected(data[:-1], match="corrupt|truncated")
    rejected(data[: len(data) // 3], match="corrupt|truncated")
    rejected(data[:20], match="truncated")
    rejected(b"x" * len(data), match="not a fastps")
    rejected(data + b"\0", match="corrupt")
    with pytest.raises(fastps.CheckpointError, match="cannot open"):
        live.load(str(tmp_path / "missing.fps"))

    for other in (make(2, dim=4, seed=4, rule=R.SPARSE_ADAM), make(2, dim=8, seed=5, rule=R.SPARSE_ADAM),
                  make(2, dim=8, seed=4, rule=R.ADAGRAD)):
        with pytest.raises(fastps.errors.InvalidArgumentError, match="the file has"):
            other.load(str(path))
        assert len(other) == 0

    live.load(str(path))  # the good file still loads into the same table
    assert len(live) == len(src) and torch.equal(pull(live, ids), pull(src, ids))


def test_load_larger_than_cap_raises(tmp_path):
    src = make(2, dim=2)
    push(src, range(50), torch.ones(50, 2), _C.SparseOptim(R.SGD), 1)
    src.save(str(tmp_path / "t.fps"))
    small = make(2, dim=2, max_rows=10)
    with pytest.raises(fastps.CapacityError, match="larger max_rows"):
        small.load(str(tmp_path / "t.fps"))
    assert len(small) == 0


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("rule_name", ["ADAGRAD", "SPARSE_ADAM", "ROWWISE_ADAGRAD"])
def test_training_is_identical_across_shard_counts(rule_name):
    rule = _C.SparseOptim(getattr(R, rule_name), lr=0.05)
    ids = torch.arange(200) * 7919 - 500_000
    results = []
    for shards in (1, 2, 3):
        t = make(shards, dim=8, seed=6, rule=getattr(R, rule_name), init=_C.SparseInit.NORMAL,
                 init_a=0.0, init_b=0.1)
        _train(t, 8, rule, seed=3)
        results.append(pull(t, ids))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_large_table_rows_are_exact_while_pages_are_populated_ahead():
    """Tables past 4 MiB per shard have the pages of their next rows populated by a
    background thread (Note [Populating ahead]) while pushes create rows and the pool
    grows (mremap): every row must still hold exactly init - lr * grad."""
    t = make(2, dim=64, seed=7)
    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=0.5)
    ids = torch.randperm(90_000, generator=torch.Generator().manual_seed(1)) * 7919 - 10**9
    init = pull(t, ids)
    grads = torch.randint(-64, 65, (len(ids), 64), generator=torch.Generator().manual_seed(2)).float() / 16
    for step, lo in enumerate(range(0, len(ids), 10_000), start=1):
        push(t, ids[lo:lo + 10_000], grads[lo:lo + 10_000], sgd, step)
    assert len(t) == len(ids) and t.stats()["memory_bytes"] > 2 * (4 << 20)
    assert torch.equal(pull(t, ids), init - 0.5 * grads)  # dyadic: exact
