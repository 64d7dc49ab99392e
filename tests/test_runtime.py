"""The embedded server's configuration, errors and lifecycle."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import fastps
from fastps import _runtime


@pytest.fixture(autouse=True)
def restore_default():
    yield
    fastps.init()


def test_version_and_info():
    assert isinstance(fastps.__version__, str) and fastps.__version__.count(".") == 2
    from fastps.__main__ import main
    assert main(["--version"]) == 0
    assert main(["info"]) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_shards=-1), "num_shards"),
    (dict(chunk_bytes=100), "chunk_bytes"),
    (dict(timeout=0), "timeout"),
])
def test_init_rejects_bad_settings(kwargs, match):
    with pytest.raises(fastps.InvalidArgumentError, match=match):
        fastps.init(**kwargs)
    assert isinstance(fastps.InvalidArgumentError("x"), ValueError)


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("FASTPS_NUM_SHARDS", "3")
    monkeypatch.setenv("FASTPS_CHUNK_BYTES", "65536")
    monkeypatch.setenv("FASTPS_TIMEOUT", "12.5")
    cfg = fastps.init()
    assert (cfg.num_shards, cfg.chunk_bytes, cfg.timeout) == (3, 65536, 12.5)
    assert _runtime.embedded().server.num_shards == 3
    monkeypatch.setenv("FASTPS_NUM_SHARDS", "many")
    with pytest.raises(fastps.InvalidArgumentError, match="FASTPS_NUM_SHARDS"):
        fastps.init()
    # keyword arguments win over the environment
    assert fastps.init(num_shards=1).num_shards == 1


@pytest.mark.parametrize("shards", [1, 2, 5])
@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
def test_results_do_not_depend_on_sharding(shards, chunk_bytes):
    def run():
        torch.manual_seed(0)
        ps = [torch.randn(5000, requires_grad=True), torch.randn(3, 7, requires_grad=True)]
        opt = fastps.optim.Adam(ps, lr=0.1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        return [p.detach().clone() for p in ps]

    fastps.init(num_shards=1, chunk_bytes=1 << 22)
    base = run()
    fastps.init(num_shards=shards, chunk_bytes=chunk_bytes)
    for a, b in zip(base, run()):
        assert torch.equal(a, b)


def test_reinit_between_steps_rebinds():
    torch.manual_seed(0)
    p = torch.randn(100, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt_p, opt_q = fastps.optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for i in range(6):
        if i == 3:
            fastps.init(num_shards=3)  # drops the old server
        g = torch.randn(100)
        p.grad, q.grad = g, g.clone()
        opt_p.step()
        opt_q.step()
    assert torch.equal(p, q)


def test_param_data_replaced_is_followed():
    """Swapping p.data (new storage) re-binds instead of writing to the old memory."""
    p = torch.zeros(10, requires_grad=True)
    opt = fastps.optim.SGD([p], lr=1.0)
    p.grad = torch.ones(10)
    opt.step()
    p.data = torch.full((10,), 5.0)
    opt.step()
    assert torch.equal(p.detach(), torch.full((10,), 4.0))


def test_optimizers_in_threads():
    """Several optimizers stepping concurrently from Python threads stay correct."""
    results = {}

    def worker(i):
        torch.manual_seed(i)
        p = torch.randn(20000, requires_grad=True)
        ref = p.detach().clone().requires_grad_()
        o, r = fastps.optim.SGD([p], lr=0.01, momentum=0.5), torch.optim.SGD([ref], lr=0.01, momentum=0.5)
        for _ in range(20):
            g = torch.randn(20000)
            p.grad, ref.grad = g, g.clone()
            o.step()
            r.step()
        results[i] = torch.equal(p, ref)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


def test_deleted_optimizer_unregisters():
    emb = _runtime.embedded()
    p = torch.zeros(10, requires_grad=True)
    opt = fastps.optim.Adam([p])
    p.grad = torch.ones(10)
    opt.step()
    tid = opt._fastps_bindings[id(p)].tensor_id
    assert emb.client.is_registered(tid)
    del opt
    gc.collect()
    assert not emb.client.is_registered(tid)


def test_unregistered_tensor_is_a_typed_error():
    emb = _runtime.embedded()
    h = fastps._C.OptimHyper()
    g = torch.zeros(4)
    with pytest.raises(fastps.InvalidArgumentError, match="not registered"):
        emb.client.update([987654321], [g.data_ptr()], [g.numel()], [0], [h])
