"""fastps.nn embeddings in the distributed mode: multi-process jobs on 127.0.0.1 (tests/_launch.py)
and in-process checks of the sparse network ops (docs/protocol.md "Sparse tables")."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastps
from fastps import _C
from fastps._local_job import poll_until

from _launch import Job, check
from _transports import ucx_param

EMB_IDS = 40


def _reference(steps: int):
    """Single-process (embedded) training on the concatenated batch of both workers."""
    torch.manual_seed(100)  # rank 0's dense initial values
    emb = fastps.nn.Embedding(8, seed=3)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8 * 3, 1))
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, EMB_IDS, (32, 3), generator=g)
    y = torch.randn(32, 1, generator=g)
    opt = fastps.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        # the mean over workers of each half's mean loss (what BSP averages)
        loss = (nn.functional.mse_loss(model(x[:16]), y[:16]) + nn.functional.mse_loss(model(x[16:]), y[16:])) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return emb, model


def _run(tmp_path, steps, **job):
    out = tmp_path / "res"
    with Job(2, ["emb", str(steps), str(out)], **job) as j:
        check(j.wait())
    return out, [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


def _check_against_reference(out, res, steps):
    emb, model = _reference(steps)
    ref_rows = emb.lookup(torch.arange(EMB_IDS))
    for r in range(2):
        torch.testing.assert_close(res[r]["rows"], ref_rows, rtol=1e-5, atol=1e-5)
        assert res[r]["step"] == steps
        assert res[r]["num_rows"] == emb.num_rows
    assert torch.equal(res[0]["rows"], res[1]["rows"])  # one table, seen alike by both workers
    return emb


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_embedding_bsp_two_workers_equals_single_process(tmp_path, transport):
    steps = 6
    out, res = _run(tmp_path, steps, env={"FASTPS_TRANSPORT": transport})  # colocated: 2 servers, ids split over them
    emb = _check_against_reference(out, res, steps)
    for r in range(2):
        # state_dict -> load_state_dict on every rank: training continues exactly as before
        torch.testing.assert_close(res[r]["rows_loaded"], res[r]["rows"], rtol=0, atol=0)
        assert torch.equal(res[r]["rows_a"], res[r]["rows_b"])
    # rank 0's state_dict holds the whole table (both servers' rows) and loads into the embedded mode
    again = fastps.nn.Embedding(8, seed=99)
    sd = torch.load(f"{out}.sd", weights_only=True)
    again.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")})
    assert again.num_rows == emb.num_rows and again.step_count == steps
    assert torch.equal(again.lookup(torch.arange(EMB_IDS)), res[0]["rows"])


@pytest.mark.slow
def test_embedding_one_dedicated_server_equals_reference(tmp_path):
    # The same training with every id on one server: partitioning does not change the result.
    steps = 6
    out, res = _run(tmp_path, steps, servers=1)
    _check_against_reference(out, res, steps)


@pytest.mark.slow
def test_killed_server_makes_embedding_workers_raise_quickly(tmp_path):
    out = tmp_path / "res"
    with Job(2, ["emb_slow", str(out)], servers=2, env={"FASTPS_TIMEOUT": "60"}, timeout=90) as job:
        job.wait_ready(out)
        os.kill(job.servers[1].pid, signal.SIGKILL)
        results = job.wait()
    for r, res in enumerate(results):
        assert res.returncode == 3, res.stderr[-3000:]
        kind, delay, msg = Path(f"{out}.{r}").read_text().split("\n", 2)
        assert kind in ("ConnectionError", "TimeoutError"), msg
        assert float(delay) < 10.0, f"worker {r} took {delay}s to notice: {msg}"


# -- in-process: one PsServer, clients standing in for workers ---------------------------

def _job(workers=1, servers=1, staleness=0, transport="auto"):
    ss = [_C.PsServer(i, workers, num_shards=2, staleness=staleness, secret="s", transport=transport)
          for i in range(servers)]
    cs = []
    for r in range(workers):
        c = _C.PsClient(r, secret="s", timeout_s=5, transport=transport)
        c.connect([("127.0.0.1", s.port) for s in ss])
        cs.append(c)
    return ss, cs


def _sgd(lr=1.0):
    return _C.SparseOptim(_C.SparseRule.SGD, lr=lr)


def _pull(c, table, ids, dim, step=0):
    ids = torch.tensor(ids, dtype=torch.int64)
    out = torch.empty(ids.numel(), dim)
    c.sparse_pull(table, ids.data_ptr(), ids.numel(), dim, out.data_ptr(), out.numel(), step).wait()
    return out


def _push(c, table, ids, grads, step, optim=None):
    ids = torch.tensor(ids, dtype=torch.int64)
    grads = torch.as_tensor(grads, dtype=torch.float32).contiguous()
    return c.sparse_push(table, ids.data_ptr(), ids.numel(), grads.shape[-1], grads.data_ptr(), grads.numel(),
                         optim or _sgd(), step)


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_bsp_push_is_the_mean_of_the_workers_rows_and_pulls_wait_for_the_round(transport):
    servers, (a, b) = _job(workers=2, servers=2, transport=transport)
    cfg = _C.SparseTableConfig(2, init=_C.SparseInit.ZEROS)
    a.sparse_create(1, cfg).wait()
    b.sparse_create(1, cfg).wait()  # idempotent
    fa = _push(a, 1, [5, 7], [[2.0, 2.0], [4.0, 0.0]], 1)
    pull = a.sparse_pull  # a pull of step 1 waits for b's push
    ids = torch.tensor([7, 5, 9, 7], dtype=torch.int64)
    out = torch.empty(4, 2)
    f = pull(1, ids.data_ptr(), 4, 2, out.data_ptr(), out.numel(), 1)
    # Both requests reached the servers and wait there: ids 5, 7 and 9 have rows on both
    # servers (the id hash is fixed), so each server holds a part of the push and of the pull.
    poll_until(lambda: sum(s.parked()["requests"] for s in servers) == 4, 10,
               "the push and the pull to be parked on both servers",
               state=lambda: f"parked per server: {[s.parked()['requests'] for s in servers]}")
    assert not f.done() and not fa.done()
    _push(b, 1, [5], [[6.0, 0.0]], 1).wait()
    f.wait()
    fa.wait()
    # (sum over workers) / 2 workers, SGD lr 1; rows in the caller's order, duplicates allowed
    assert torch.equal(out, torch.tensor([[-2.0, 0.0], [-4.0, -1.0], [0.0, 0.0], [-2.0, 0.0]]))
    st = a.sparse_stats(1, 1)
    assert st["rows"] == 2 and st["step"] == 1


def test_sparse_requests_raise_typed_errors():
    _, (c,) = _job()
    cfg = _C.SparseTableConfig(4)
    with pytest.raises(fastps.InvalidArgumentError, match="no sparse table"):
        _pull(c, 3, [1], 4)
    c.sparse_create(3, cfg).wait()
    with pytest.raises(fastps.InvalidArgumentError, match="another spec"):
        c.sparse_create(3, _C.SparseTableConfig(4, seed=1)).wait()
    with pytest.raises(fastps.InvalidArgumentError, match="next step is 1"):
        _push(c, 3, [1], [[1.0] * 4], 2).wait()
    with pytest.raises(fastps.InvalidArgumentError, match="dim 4"):
        _push(c, 3, [1], [[1.0] * 3], 1).wait()
    with pytest.raises(fastps.InvalidArgumentError, match="rule"):
        _push(c, 3, [1], [[1.0] * 4], 1, _C.SparseOptim(_C.SparseRule.ADAGRAD)).wait()
    with pytest.raises(fastps.InvalidArgumentError):
        _C.SparseTableConfig(0)
    _push(c, 3, [1], [[1.0] * 4], 1).wait()  # the table still serves
    assert c.sparse_stats(3, 1)["rows"] == 1
    with pytest.raises(fastps.FastPSError, match="not a fastps|cannot open|No such"):
        c.sparse_load(3, cfg, "/nonexistent/table.fpst")


def test_capacity_error_is_typed_and_the_table_keeps_working():
    _, (c,) = _job()
    c.sparse_create(4, _C.SparseTableConfig(2, max_rows=2)).wait()
    with pytest.raises(fastps.CapacityError, match="max_rows"):
        _push(c, 4, [1, 2, 3, 4, 5, 6], [[1.0, 1.0]] * 6, 1).wait()
    _push(c, 4, [], torch.empty(0, 2), 2).wait()


def test_capacity_error_names_the_max_rows_the_user_set():
    # max_rows=4 over 2 servers: each holds 2, but the message names the user's 4.
    _, (c,) = _job(servers=2)
    c.sparse_create(4, _C.SparseTableConfig(2, max_rows=4)).wait()
    with pytest.raises(fastps.CapacityError, match="max_rows=4") as e:
        _push(c, 4, list(range(12)), [[1.0, 1.0]] * 12, 1).wait()
    assert "max_rows=2" not in str(e.value)
    share = r"max_rows=3 over 2 server\(s\) gives server 1 a share of 1 row.*shards \(2\)"
    with pytest.raises(fastps.InvalidArgumentError, match=share):
        c.sparse_create(5, _C.SparseTableConfig(2, max_rows=3)).wait()


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_dead_worker_fails_the_round_at_once(transport):
    _, (a, b) = _job(workers=2, transport=transport)
    cfg = _C.SparseTableConfig(2)
    a.sparse_create(1, cfg).wait()
    b.sparse_create(1, cfg).wait()
    f = _push(a, 1, [1], [[1.0, 1.0]], 1)
    del b  # the second worker's connection drops before it pushed
    t0 = time.monotonic()
    with pytest.raises(fastps.ConnectionError, match="worker rank 1"):
        f.wait()
    assert time.monotonic() - t0 < 5


def test_save_and_load_over_two_servers_round_trip(tmp_path):
    _, (c,) = _job(servers=2)
    cfg = _C.SparseTableConfig(3, rule=_C.SparseRule.ADAGRAD)
    c.sparse_create(2, cfg).wait()
    ids = list(range(-20, 20))
    _push(c, 2, ids, torch.randn(40, 3), 1, _C.SparseOptim(_C.SparseRule.ADAGRAD, lr=0.1)).wait()
    before = _pull(c, 2, ids, 3, 1)
    path = str(tmp_path / "t.fpst")
    c.sparse_save(2, cfg, 1, path)
    _push(c, 2, ids, torch.randn(40, 3), 2, _C.SparseOptim(_C.SparseRule.ADAGRAD, lr=0.1)).wait()
    assert not torch.equal(_pull(c, 2, ids, 3, 2), before)
    assert c.sparse_load(2, cfg, path) == 1
    assert torch.equal(_pull(c, 2, ids, 3, 1), before)
    # the file is the embedded table's format: it loads into any shard count
    t = _C.SparseTable(_C.Server(3), 3, rule=_C.SparseRule.ADAGRAD)
    t.load(path)
    out = torch.empty(40, 3)
    id_tensor = torch.tensor(ids)  # alive while the native call reads it
    t.pull(id_tensor.data_ptr(), 40, out.data_ptr(), out.numel())
    assert torch.equal(out, before) and t.step == 1


def test_load_of_a_mismatched_or_corrupt_file_over_the_network_changes_nothing(tmp_path):
    """The network client checks a file as the embedded table does (one check_file_fits):
    a field that would change the values of absent ids is named; corruption is told apart."""
    _, (c,) = _job(servers=2)
    cfg = _C.SparseTableConfig(3, rule=_C.SparseRule.ADAGRAD)
    c.sparse_create(4, cfg).wait()
    ids = list(range(10))
    _push(c, 4, ids, torch.randn(10, 3), 1, _C.SparseOptim(_C.SparseRule.ADAGRAD, lr=0.1)).wait()
    path = tmp_path / "t.fpst"
    c.sparse_save(4, cfg, 1, str(path))
    before = _pull(c, 4, ids, 3, 1)
    other = _C.SparseTableConfig(3, rule=_C.SparseRule.ADAGRAD, seed=cfg.seed + 1)
    with pytest.raises(fastps.errors.InvalidArgumentError, match=r"sparse table 4: the file has seed = "):
        c.sparse_load(4, other, str(path))
    data = bytearray(path.read_bytes())
    data[56] ^= 0x01  # inside the seed field: the digest no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(fastps.CheckpointError, match="corrupt"):
        c.sparse_load(4, cfg, str(path))
    assert torch.equal(_pull(c, 4, ids, 3, 1), before)
