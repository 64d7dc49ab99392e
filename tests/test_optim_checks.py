"""What fastps checks before a tensor's memory is used by the native core (issue 16, item 2).

Every native call that takes an address also takes its element count, and
checks it before the address is used.
"""

from __future__ import annotations

import pytest
import torch

import fastps
from fastps import _C, _runtime


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
