"""Multi-process tests of the distributed mode on 127.0.0.1 (see tests/_launch.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastps
from fastps import _C
from fastps._local_job import poll_until

from _launch import Job, check, failures
from _transports import ucx_param
from _wait import wait_parked


def _reference(name: str, steps: int):
    """Single-process training on the concatenated global batch (both halves)."""
    torch.manual_seed(100)  # rank 0's initial parameters
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 1, generator=g)
    kw = {"SGD": dict(lr=0.05, momentum=0.9), "Adam": dict(lr=0.01), "Adagrad": dict(lr=0.05)}[name]
    opt = getattr(torch.optim, name)(model.parameters(), **kw)
    for _ in range(steps):
        # mean over the global batch == mean over workers of each half's mean (equal halves)
        loss = (nn.functional.mse_loss(model(x[:16]), y[:16]) + nn.functional.mse_loss(model(x[16:]), y[16:])) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _load(out: Path, ranks: int):
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(ranks)]


@pytest.mark.parametrize("name,transport", [pytest.param("SGD", "auto", marks=pytest.mark.slow), ("Adam", "auto"),
                                            ucx_param("Adam", "ucx"),
                                            pytest.param("Adagrad", "auto", marks=pytest.mark.slow)])
def test_bsp_two_workers_two_servers_equals_single_process(tmp_path, name, transport):
    out = tmp_path / "res"
    with Job(2, ["train", name, "15", str(out)], servers=2, env={"FASTPS_TRANSPORT": transport}) as job:
        check(job.wait())
    res = _load(out, 2)
    ref = _reference(name, 15)
    for r in range(2):
        for p, q in zip(res[r]["params"], ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # float32 summation order
    for a, b in zip(res[0]["params"], res[1]["params"]):
        assert torch.equal(a, b)  # every worker holds the same parameters
    for r in range(2):
        assert torch.equal(res[r]["unused"], torch.full((3000,), 0.5))  # skipped every step


@pytest.mark.parametrize("transport,remote", [("auto", "shm"), ("tcp", "tcp"), ucx_param("ucx", "ucx")])
def test_colocated_servers_bsp(tmp_path, transport, remote):
    out = tmp_path / "res"
    with Job(2, ["train", "Adam", "10", str(out)], env={"FASTPS_TRANSPORT": transport}) as job:
        check(job.wait())
    res = _load(out, 2)
    for p, q in zip(res[0]["params"], _reference("Adam", 10)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    # Each worker reaches its own server in-process and the other one as configured.
    assert res[0]["paths"] == ["local", remote] and res[1]["paths"] == [remote, "local"]
    for r in range(2):  # its pushes carry no values (a config block alone, copied for the local server)
        assert torch.equal(res[r]["unused"], torch.full((3000,), 0.5))


@pytest.mark.parametrize("staleness,transport", [pytest.param("-1", "auto", marks=pytest.mark.slow), ("2", "auto"),
                                                  ucx_param("2", "ucx"), ucx_param("-1", "ucx", marks=[pytest.mark.slow])])
def test_asp_and_ssp_converge(tmp_path, staleness, transport):
    out = tmp_path / "res"
    with Job(2, ["train", "Adam", "40", str(out)],
             env={"FASTPS_STALENESS": staleness, "FASTPS_TRANSPORT": transport}) as job:
        check(job.wait())
    for r in _load(out, 2):
        losses = r["losses"]
        assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("name", [pytest.param("SGD", marks=pytest.mark.slow), "Adam"])
def test_distributed_optimizer_matches_ddp(tmp_path, name):
    a, b = tmp_path / "fastps", tmp_path / "ddp"
    with Job(2, ["wrap", name, "12", str(a)]) as job:
        check(job.wait())
    with Job(2, ["ddp", name, "12", str(b)]) as job:
        check(job.wait())
    ours, ddp = _load(a, 2), _load(b, 2)
    for r in range(2):
        for p, q in zip(ours[r]["params"], ddp[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert ours[r]["losses"] == pytest.approx(ddp[r]["losses"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("env,raises", [({"FASTPS_OVERLAP": "1"}, False), ({"FASTPS_OVERLAP": "0"}, False),
                                        ({"FASTPS_STALENESS": "2"}, True)])
def test_gradient_edited_after_its_push(tmp_path, env, raises):
    """clip_grad_norm_ between backward and step(): under BSP the round is deferred (Note
    [Deferred apply]) and the clipped gradient is what the servers apply (tests/test_grad_edits.py
    checks the values); under SSP each push is applied as it arrives, so step() raises instead of
    silently ignoring the clip."""
    out = tmp_path / "res"
    with Job(2, ["clip", str(out)], env=env) as job:
        check(job.wait())
    for r in range(2):
        text = Path(f"{out}.{r}").read_text()
        if raises:
            assert text.startswith("FastPSError") and "FASTPS_OVERLAP=0" in text, text
        else:
            assert text == "ok", text


@pytest.mark.parametrize("sync", [pytest.param("sync", marks=pytest.mark.slow), "nosync"])
def test_distributed_optimizer_clips_the_averaged_gradient(tmp_path, sync):
    """DistributedOptimizer: clip_grad_norm_ between backward and step() clips the
    averaged gradient (the global batch's), as single-process training does: backward
    returns with the gradients averaged; an explicit synchronize() (the older API) is
    a no-op then."""
    steps = 8
    out = tmp_path / "res"
    with Job(2, ["wrap_clip", sync, str(steps), str(out)]) as job:
        check(job.wait())
    torch.manual_seed(100)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (nn.functional.mse_loss(model(x[:16]), y[:16]) + nn.functional.mse_loss(model(x[16:]), y[16:])) / 2
        opt.zero_grad()
        loss.backward()
        assert nn.utils.clip_grad_norm_(model.parameters(), 0.05) > 0.05  # the clip bites
        opt.step()
    for r in range(2):
        res = torch.load(f"{out}.{r}", weights_only=True)
        assert "error" not in res, res["error"]
        for p, q in zip(res["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_in_distributed_mode(tmp_path):
    out = tmp_path / "res"
    with Job(2, ["resume", "Adam", "5", str(out)]) as job:
        check(job.wait())
    for r in _load(out, 2):
        assert r["after"] == r["again"]


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_killed_server_makes_workers_raise_quickly(tmp_path, transport):
    out = tmp_path / "res"
    with Job(2, ["slow", str(out)], servers=2, env={"FASTPS_TIMEOUT": "60", "FASTPS_TRANSPORT": transport},
             timeout=90) as job:
        results, elapsed = job.signal_server_once_training(out, 0, signal.SIGKILL)
    for r, (kind, delay, msg) in enumerate(failures(out, results)):
        assert kind in ("ConnectionError", "TimeoutError"), msg
        assert delay < 10.0, f"worker {r} took {delay}s to notice: {msg}"
    assert elapsed < 15.0


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_wrong_secret_is_rejected_and_server_keeps_serving(transport):
    server = _C.PsServer(0, 1, secret="right", transport=transport)
    addr = [("127.0.0.1", server.port)]
    bad = _C.PsClient(0, secret="wrong", timeout_s=5, transport=transport)
    with pytest.raises(fastps.ConnectionError, match="secret"):
        bad.connect(addr)
    good = _C.PsClient(0, secret="right", timeout_s=5, chunk_bytes=4096, transport=transport)
    good.connect(addr)
    _roundtrip(good)
    if transport == "ucx":
        assert good.stats()["ucx_connections"] == 1, good.stats()
    # The server counts the refused peer and the served one; the client its own connection.
    assert good.stats()["connections_open"] == 1 and good.stats()["handshakes_failed"] == 0, good.stats()
    poll_until(lambda: server.stats()["handshakes_failed"] == 1, 5, "the server to count the refused peer",
               state=lambda: str(server.stats()))
    st = server.stats()
    assert (st["connections_opened"], st["connections_open"]) == (1, 1), st
    del good
    poll_until(lambda: server.stats()["connections_closed"] == 1, 5, "the server to count the closed connection",
               state=lambda: str(server.stats()))
    assert server.stats()["connections_open"] == 0


def _roundtrip(client, tid=1):
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    h.lr = 0.5
    p = torch.arange(3000, dtype=torch.float32)
    client.register_dense(tid, 3000, False, h, p.data_ptr(), p.numel()).wait()
    g = torch.ones(3000)
    client.push(tid, g.data_ptr(), g.numel(), h, 1).wait()
    out = torch.empty(3000)
    client.pull(tid, out.data_ptr(), out.numel(), 1).wait()
    assert torch.equal(out, p - 0.5)


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
@pytest.mark.parametrize("garbage", [
    pytest.param(os.urandom(4096), id="random"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    pytest.param(b"FPS1" + b"\x01\x00" + b"\x01" + b"\x00" * 41 + b"\xff" * 8, id="huge-length"),
    pytest.param(b"FPS1\x01\x00", id="truncated"),
])
def test_garbage_bytes_do_not_hurt_the_server(garbage, transport):
    server = _C.PsServer(0, 1, secret="s", transport=transport)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(garbage)
            s.settimeout(0.3)
            try:
                s.recv(100)
            except (socket.timeout, ConnectionResetError):
                pass
    client = _C.PsClient(0, secret="s", timeout_s=5, chunk_bytes=4096, transport=transport)
    client.connect([("127.0.0.1", server.port)])
    _roundtrip(client)


@pytest.mark.parametrize("transport", ["tcp", "shm", ucx_param("ucx")])
def test_a_dead_worker_fails_the_round_and_the_server_survives(transport):
    # 3 workers, rank 2 leaves: rank 0's push_pull is parked, then failed; rank
    # 1's push to the same doomed round must fail too, not crash the server
    # (Note [Deferred first gradient]: the parked first gradient is summed
    # before its request fails).
    server = _C.PsServer(0, 3, secret="s", transport=transport)
    addr = [("127.0.0.1", server.port)]
    clients = [_C.PsClient(r, secret="s", timeout_s=5, transport=transport) for r in range(3)]
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    init = torch.zeros(1000)
    for c in clients:
        c.connect(addr)
        c.register_dense(1, 1000, True, h, init.data_ptr(), init.numel()).wait()
    g0, out0 = torch.ones(1000), torch.empty(1000)
    parked = clients[0].push_pull(1, g0.data_ptr(), g0.numel(), out0.data_ptr(), out0.numel(), 1)
    wait_parked(server, 1, "rank 0's push_pull")  # then rank 2 leaves: the round is doomed
    del c, clients[2]  # the last reference to rank 2's client (the loop's c was one): it disconnects
    with pytest.raises(fastps.ConnectionError, match="worker rank 2 disconnected"):
        parked.wait()
    g1, out1 = torch.ones(1000), torch.empty(1000)
    with pytest.raises(fastps.ConnectionError, match="worker rank 2 disconnected"):
        clients[1].push_pull(1, g1.data_ptr(), g1.numel(), out1.data_ptr(), out1.numel(), 1).wait()
    # The server still serves: a fresh key for the two survivors cannot
    # complete either (3 workers), but a plain registration and pull work.
    clients[0].register_dense(2, 10, False, h, init[:10].data_ptr(), 10).wait()
    clients[1].register_dense(2, 10, False, h, 0, 0).wait()  # placement only
    out = torch.empty(10)
    clients[1].pull(2, out.data_ptr(), out.numel(), 0).wait()
    assert torch.equal(out, torch.zeros(10))


def test_request_errors_are_typed():
    server = _C.PsServer(0, 1, secret="s")
    client = _C.PsClient(0, secret="s", timeout_s=5, chunk_bytes=4096)
    client.connect([("127.0.0.1", server.port)])
    with pytest.raises(fastps.InvalidArgumentError, match="not registered"):
        client.pull(99, torch.empty(1).data_ptr(), 1, 0)


def test_unreachable_server_is_a_connection_error():
    from fastps._cluster import free_port
    client = _C.PsClient(0, secret="s", timeout_s=3)
    with pytest.raises((fastps.ConnectionError, fastps.TimeoutError)):
        client.connect([("127.0.0.1", free_port())])


def test_client_outside_a_job_explains():
    with pytest.raises(fastps.InvalidArgumentError, match="torchrun"):
        fastps.Client()


def test_local_requests_queued_behind_a_busy_shard_use_their_own_data():
    """A colocated server's shards run small local requests inline when idle, and
    queue them behind work otherwise; a queued request must not read anything of
    the caller's call frame (an earlier bug: the optimizer config of a gradient-less
    push was read from PsClient::push's dead stack). Each small key gets its own
    lr, so a config read from a reused frame shows as wrong values."""
    server = _C.PsServer(0, 1, num_shards=2, secret="s")
    client = _C.PsClient(0, secret="s", timeout_s=30, chunk_bytes=1 << 20)
    client.connect([("127.0.0.1", server.port)])
    client.attach_local(server, 0)
    assert client.server_paths() == ["local"]

    def adam(lr: float):
        h = _C.OptimHyper()
        h.kind, h.lr, h.beta1, h.beta2, h.eps = _C.OptimKind.ADAM, lr, 0.9, 0.999, 1e-8
        return h

    big_n, keys, n = 8 << 20, range(2, 18), 64
    big = torch.zeros(big_n)
    client.register_dense(1, big_n, False, adam(1e-3), big.data_ptr(), big_n).wait()
    gen = torch.Generator().manual_seed(3)
    init = {k: torch.randn(n, generator=gen) for k in keys}
    for k in keys:
        client.register_dense(k, n, False, adam(0.01 * k), init[k].data_ptr(), n).wait()
    ref = {k: torch.nn.Parameter(init[k].clone()) for k in keys}
    ropt = {k: torch.optim.Adam([ref[k]], lr=0.01 * k, eps=1e-8) for k in keys}
    big_grad = torch.ones(big_n)
    queued = 0
    for step in range(1, 4):
        grads = {k: torch.randn(n, generator=gen) for k in keys}
        skip = {k for k in keys if (k + step) % 3 == 0}  # no gradient this step: a config-only push
        busy = client.push(1, big_grad.data_ptr(), big_grad.numel(), adam(1e-3), step)
        futures = [client.push(k, *((0, 0) if k in skip else (grads[k].data_ptr(), n)), adam(0.01 * k), step)
                   for k in keys]
        queued += sum(not f.done() for f in futures)
        busy.wait()
        for f in futures:
            f.wait()
        for k in keys:
            ref[k].grad = None if k in skip else grads[k].clone()
            ropt[k].step()
    assert queued > 0  # the precondition: some requests did wait behind the big one
    for k in keys:
        out = torch.empty(n)
        client.pull(k, out.data_ptr(), out.numel(), 0).wait()
        torch.testing.assert_close(out, ref[k].detach(), rtol=1e-6, atol=1e-6)


def _two_workers_one_sum_key():
    """A server of 2 workers with an SGD aggregation key 1 of 4 values; rank 0 registered it."""
    server = _C.PsServer(0, 2, num_shards=1, secret="s")
    a, b = (_C.PsClient(r, secret="s", timeout_s=5) for r in (0, 1))
    for c in (a, b):
        c.connect([("127.0.0.1", server.port)])
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    z = torch.zeros(4)
    a.register_dense(1, 4, True, h, z.data_ptr(), z.numel()).wait()
    return server, a, b, h, z


def test_re_register_fails_waiting_requests():
    server, a, b, h, z = _two_workers_one_sum_key()
    # A request parked on a chunk that is registered again gets an error, not silence.
    g, out = torch.ones(4), torch.empty(4)
    parked = a.push_pull(1, g.data_ptr(), g.numel(), out.data_ptr(), out.numel(), 1)  # waits for rank 1's push
    wait_parked(server, 1, "rank 0's push_pull")  # else the registration could come first
    b.register_dense(1, 4, True, h, z.data_ptr(), z.numel()).wait()
    with pytest.raises(fastps.InvalidArgumentError, match="registered again"):
        parked.wait()


@pytest.mark.parametrize("transport", ["auto", ucx_param("ucx")])
def test_a_reply_after_the_deadline_never_writes_into_the_callers_buffer(transport):
    """Once wait() raised TimeoutError the caller may free the output buffer
    (fastps.nn's RemoteTable.pull does): a late reply must be dropped, not
    written into that memory (it corrupted the heap)."""
    server = _C.PsServer(0, 2, num_shards=1, secret="s", transport=transport)
    a = _C.PsClient(0, secret="s", timeout_s=1, transport=transport)
    b = _C.PsClient(1, secret="s", timeout_s=5, transport=transport)
    cfg = _C.SparseTableConfig(4, init=_C.SparseInit.ZEROS)
    for c in (a, b):
        c.connect([("127.0.0.1", server.port)])
        c.sparse_create(1, cfg).wait()
    ids = torch.arange(3)
    out = torch.full((3, 4), 7.0)
    pull = a.sparse_pull(1, ids.data_ptr(), 3, 4, out.data_ptr(), out.numel(), 1)  # waits for step 1
    with pytest.raises(fastps.TimeoutError):
        pull.wait()
    g = torch.ones(3, 4)
    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    received = a.stats()["messages_received"]
    for f in [c.sparse_push(1, ids.data_ptr(), 3, 4, g.data_ptr(), g.numel(), sgd, 1) for c in (a, b)]:
        f.wait()  # step 1 completes: the parked pull is answered now
    poll_until(lambda: a.stats()["messages_received"] >= received + 2, 10, "the late pull reply (and the "
               "push's) to reach rank 0", state=lambda: f"{a.stats()['messages_received'] - received} replies")
    assert torch.equal(out, torch.full((3, 4), 7.0))  # the late reply was dropped
    fresh = torch.empty(3, 4)
    a.sparse_pull(1, ids.data_ptr(), 3, 4, fresh.data_ptr(), fresh.numel(), 1).wait()  # the client still works
    assert torch.equal(fresh, torch.full((3, 4), -1.0))


def test_a_refused_sparse_load_leaves_the_table_usable(tmp_path):
    """A load the server refuses (rows of another dim; a cap below the shard count)
    must not change what the table accepts afterwards."""
    server = _C.PsServer(0, 1, num_shards=3, secret="s")
    c = _C.PsClient(0, secret="s", timeout_s=5)
    c.connect([("127.0.0.1", server.port)])
    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    four, eight = _C.SparseTableConfig(4, init=_C.SparseInit.ZEROS), _C.SparseTableConfig(8)
    c.sparse_create(1, four).wait()
    c.sparse_create(2, eight).wait()
    ids, g8, g4 = torch.arange(30), torch.ones(30, 8), torch.ones(3, 4)
    c.sparse_push(2, ids.data_ptr(), 30, 8, g8.data_ptr(), g8.numel(), sgd, 1).wait()
    c.sparse_save(2, eight, 1, str(tmp_path / "dim8.bin"))
    with pytest.raises(fastps.InvalidArgumentError, match="dim 8 into sparse table 1 of dim 4"):
        c.sparse_load(1, eight, str(tmp_path / "dim8.bin"))  # the file matches the config, not the table
    capped = _C.SparseTableConfig(8, max_rows=2)  # 2 rows over 3 shards: a shard would get no cap
    with pytest.raises(fastps.InvalidArgumentError, match="below its number of shards"):
        c.sparse_load(2, capped, str(tmp_path / "dim8.bin"))
    out = torch.empty(3, 4)
    c.sparse_push(1, ids.data_ptr(), 3, 4, g4.data_ptr(), g4.numel(), sgd, 1).wait()
    c.sparse_pull(1, ids.data_ptr(), 3, 4, out.data_ptr(), out.numel(), 1).wait()
    assert torch.equal(out, torch.full((3, 4), -1.0))


def test_sparse_rules_are_the_same_embedded_and_over_the_network(tmp_path):
    """One rule each (sparse_check_cap_split, sparse_shard_table, sparse_route,
    sparse_check_file_rows, SparseStatsSum): an embedded table on 3 shards and a
    network table on one server of 3 shards refuse the same cap with the same words,
    split the same cap over the same shards (the same pushes fit and fail), count
    the same stats and refuse the same oversized file."""
    import re

    server = _C.PsServer(0, 1, num_shards=3, secret="s")
    c = _C.PsClient(0, secret="s", timeout_s=5)
    c.connect([("127.0.0.1", server.port)])

    def refusal(fn):
        with pytest.raises(fastps.InvalidArgumentError) as e:
            fn()
        m = re.search(r"max_rows=2( over 1 server\(s\))? gives (the table|server 0) a share of 2 row\(s\)"
                      r"(, below its number of shards.*)", str(e.value))
        assert m, str(e.value)
        return m.group(3)

    assert refusal(lambda: _C.SparseTable(_C.Server(3), 4, max_rows=2)) == refusal(
        lambda: c.sparse_create(1, _C.SparseTableConfig(4, max_rows=2)).wait())

    sgd = _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    embedded = _C.SparseTable(_C.Server(3), 4, max_rows=7)  # shards get 3, 2 and 2 rows
    c.sparse_create(2, _C.SparseTableConfig(4, max_rows=7)).wait()
    fits = {"embedded": [], "network": []}
    for step, i in enumerate(range(40), start=1):
        ids, g = torch.tensor([i]), torch.ones(1, 4)
        try:
            embedded.push(ids.data_ptr(), 1, g.data_ptr(), g.numel(), sgd, step)
            fits["embedded"].append(i)
        except fastps.CapacityError:
            pass
        try:
            c.sparse_push(2, ids.data_ptr(), 1, 4, g.data_ptr(), g.numel(), sgd, step).wait()
            fits["network"].append(i)
        except fastps.CapacityError:
            pass
    assert len(fits["embedded"]) == 7 and fits["embedded"] == fits["network"]
    net = c.sparse_stats(2, 40)
    assert net.pop("step") == 40 and embedded.stats() == net

    embedded.save(str(tmp_path / "seven.fps"))
    small = _C.SparseTable(_C.Server(3), 4, max_rows=3)
    c.sparse_create(3, _C.SparseTableConfig(4, max_rows=3)).wait()
    words = []
    for load in (lambda: small.load(str(tmp_path / "seven.fps")),
                 lambda: c.sparse_load(3, _C.SparseTableConfig(4, max_rows=3), str(tmp_path / "seven.fps"))):
        with pytest.raises(fastps.CapacityError) as e:
            load()
        words.append(re.search(r"the file holds more rows than this table's cap \(max_rows=3", str(e.value)))
    assert all(words), words


def test_attach_local_refuses_a_rank_outside_the_servers_job():
    server = _C.PsServer(0, 1, num_shards=1, secret="s")
    c = _C.PsClient(1, secret="s", timeout_s=5)
    c.connect([("127.0.0.1", server.port)])
    with pytest.raises(fastps.InvalidArgumentError, match="local worker rank 1 outside the job's 1 workers"):
        c.attach_local(server, 0)


def test_round_clocks_and_table_steps_are_the_native_clients(tmp_path):
    """Note [Round clocks]: each registered tensor counts the rounds it was sent in,
    a round ends whatever happened (an unknown tensor changes nothing), and a sparse
    table's step is its last push's or the loaded file's."""
    server = _C.PsServer(0, 1, num_shards=2, secret="s")
    c = _C.PsClient(0, secret="s", timeout_s=5)
    c.connect([("127.0.0.1", server.port)])
    z = torch.zeros(4)
    c.register_dense(1, 4, True, _C.OptimHyper(), z.data_ptr(), z.numel()).wait()
    c.register_dense(2, 4, True, _C.OptimHyper(), z.data_ptr(), z.numel()).wait()
    assert (c.round(1), c.advance_round(1), c.round(1), c.round(2)) == (0, 1, 1, 0)
    c.end_round([1, 2])
    with pytest.raises(fastps.InvalidArgumentError, match="tensor 9 is not registered"):
        c.end_round([1, 9])
    assert (c.round(1), c.round(2)) == (2, 1)
    cfg, sgd = _C.SparseTableConfig(4), _C.SparseOptim(_C.SparseRule.SGD, lr=1.0)
    c.sparse_create(7, cfg).wait()
    ids, g = torch.arange(3), torch.ones(3, 4)
    assert c.sparse_step(7) == 0
    c.sparse_push(7, ids.data_ptr(), 3, 4, g.data_ptr(), g.numel(), sgd, 1).wait()
    c.sparse_push(7, ids.data_ptr(), 3, 4, g.data_ptr(), g.numel(), sgd, 2).wait()
    c.sparse_save(7, cfg, 2, str(tmp_path / "t.bin"))
    c.sparse_create(8, cfg).wait()
    assert (c.sparse_step(7), c.sparse_step(8)) == (2, 0)
    assert c.sparse_load(8, cfg, str(tmp_path / "t.bin")) == 2 and c.sparse_step(8) == 2


def test_a_second_connection_of_a_live_rank_closing_does_not_kill_the_rank():
    server, a, b, h, z = _two_workers_one_sum_key()
    b.register_dense(1, 4, True, h, 0, 0).wait()
    stray = _C.PsClient(0, secret="s", timeout_s=5)  # claims rank 0 too (a tool, a restarted process)
    stray.connect([("127.0.0.1", server.port)])
    stray.register_dense(2, 4, False, h, z.data_ptr(), z.numel()).wait()  # talks to the server as rank 0
    # A pull of a version that never comes stays parked until the server drops the
    # stray's connection: its disappearance shows the server has seen the disconnect.
    never = torch.empty(4)
    stray.pull(2, never.data_ptr(), never.numel(), 1)
    wait_parked(server, 1, "the stray connection's pull")
    del stray
    wait_parked(server, 0, "the stray's pull, dropped with its connection")
    ga, gb, oa, ob = torch.ones(4), torch.full((4,), 2.0), torch.empty(4), torch.empty(4)
    fa = a.push_pull(1, ga.data_ptr(), ga.numel(), oa.data_ptr(), oa.numel(), 1)
    fb = b.push_pull(1, gb.data_ptr(), gb.numel(), ob.data_ptr(), ob.numel(), 1)
    fa.wait()
    fb.wait()
    assert torch.equal(oa, torch.full((4,), 3.0)) and torch.equal(ob, oa)


def test_late_param_group_non_contiguous_parameter_and_frozen_parameters(tmp_path):
    """A param group added after training started steps with the others (its
    rounds count from its registration; it timed out before); a non-contiguous
    parameter is refused (it was read and written in storage order); a frozen
    parameter under DistributedOptimizer(AdamW) is left alone (it was given zero
    gradients and weight decay)."""
    out = tmp_path / "res"
    with Job(2, ["edges", str(out)]) as job:
        check(job.wait())
    torch.manual_seed(100)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.05)
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": [p for n, p in model.named_parameters() if not n.startswith("0.")]})
        loss = (nn.functional.mse_loss(model(x[:16]), y[:16]) + nn.functional.mse_loss(model(x[16:]), y[16:])) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in range(2):
        res = torch.load(f"{out}.{r}", weights_only=True)
        for p, q in zip(res["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
        assert "not contiguous" in res["contiguity"], res["contiguity"]
        assert res["frozen_kept"]


def test_ctrl_c_interrupts_a_wait_long_before_its_deadline(tmp_path):
    """Native waits run in slices with the GIL's signal check between them, so
    Ctrl-C while waiting for a peer that never pushes raises KeyboardInterrupt
    at once, not at the (here 60 s) deadline."""
    script = tmp_path / "wait.py"
    script.write_text(
        "import os, signal, threading, time, torch\n"
        "from fastps import _C\n"
        "server = _C.PsServer(0, 2, num_shards=1, secret='s')\n"
        "c = _C.PsClient(0, secret='s', timeout_s=60)\n"
        "c.connect([('127.0.0.1', server.port)])\n"
        "h = _C.OptimHyper()\n"
        "h.kind = _C.OptimKind.SGD\n"
        "z, g, out = torch.zeros(4), torch.ones(4), torch.empty(4)\n"
        "c.register_dense(1, 4, True, h, z.data_ptr(), z.numel()).wait()\n"
        "f = c.push_pull(1, g.data_ptr(), g.numel(), out.data_ptr(), out.numel(), 1)  # rank 1 never pushes\n"
        "t = time.monotonic()\n"
        "try:  # the Ctrl-C is caught wherever it lands, also before f.wait() on a loaded machine\n"
        "    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "    f.wait()\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted after %.2f s' % (time.monotonic() - t))\n")
    import subprocess
    import sys
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("interrupted after"), res.stdout + res.stderr[-2000:]
    assert float(res.stdout.split()[2]) < 5.0
