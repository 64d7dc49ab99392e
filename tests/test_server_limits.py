"""What a peer can make a parameter server hold (docs/protocol.md, "Limits"): requests
parked for a later round or step cost what their frames carried, are capped per
connection, and go when their connection closes. In-process PsServer, PsClients
standing in for workers (every frame below is one a misbehaving peer can send)."""

from __future__ import annotations

import os

import pytest
import torch

import fastps
from fastps import _C

from _wait import wait_parked

FAR = 1_000_000  # a step / version no round will reach in these tests


def _memory() -> tuple[int, int]:
    """(virtual, resident) bytes of this process, which hosts the server."""
    with open("/proc/self/statm") as f:
        size, resident = f.read().split()[:2]
    page = os.sysconf("SC_PAGE_SIZE")
    return int(size) * page, int(resident) * page


def _client(server, rank=0):
    c = _C.PsClient(rank, secret="s", timeout_s=5)
    c.connect([("127.0.0.1", server.port)])
    return c


def _sgd():
    h = _C.OptimHyper()
    h.kind, h.lr = _C.OptimKind.SGD, 0.5
    return h


def test_far_future_pulls_of_a_wide_table_hold_no_reply_memory():
    # 16 pulls of one id of dim 2^22 for a step no one will push: 16 x 56 bytes on
    # the wire. The server held (and zeroed) a 16 MiB reply buffer for each, from
    # arrival until long after the peer was gone.
    server = _C.PsServer(0, 1, num_shards=2, secret="s")
    c = _client(server)
    dim = 1 << 22
    c.sparse_create(1, _C.SparseTableConfig(dim)).wait()
    ids = torch.tensor([7], dtype=torch.int64)
    out = torch.empty(dim)  # one destination for every pull: none is ever answered
    before = _memory()
    futures = [c.sparse_pull(1, ids.data_ptr(), 1, dim, out.data_ptr(), out.numel(), FAR + k) for k in range(16)]
    c.sparse_stats(1, 0)  # answered after every shard took the pulls in (one queue per shard)
    grown = [(now - then) >> 20 for now, then in zip(_memory(), before)]
    # 16 x 16 MiB if the replies' rows are made (or only reserved) before the replies
    assert max(grown) < 64, f"16 parked pulls of 8 bytes each grew the server by {grown} MiB (virtual, resident)"
    assert not any(f.done() for f in futures)
    assert server.parked() == {"requests": 16, "bytes": 16 * 8}
    del c  # the connection closes: its parked requests go
    wait_parked(server, 0)
    assert server.parked()["bytes"] == 0


def test_a_closed_connection_frees_its_parked_requests_while_its_rank_lives():
    # Parked requests were dropped only when a rank's *last* connection closed; a
    # second connection claiming a live rank could park without end.
    server = _C.PsServer(0, 1, num_shards=2, secret="s")
    live = _client(server)
    zeros, ones = torch.zeros(4), torch.ones(4)  # alive while the native calls read them
    live.register_dense(1, 4, False, _sgd(), zeros.data_ptr(), 4).wait()
    live.sparse_create(2, _C.SparseTableConfig(4)).wait()
    stray = _client(server)  # rank 0 again
    stray.register_dense(1, 4, False, _sgd(), 0, 0).wait()  # placement only: the server keeps the chunk
    ids, out = torch.arange(3), torch.empty(3 * 4)
    for k in range(5):
        stray.pull(1, out.data_ptr(), 4, FAR + k)  # a dense pull of a far-future version
        stray.sparse_pull(2, ids.data_ptr(), 3, 4, out.data_ptr(), 12, FAR + k)
    stray.sparse_stats(2, 0)
    assert wait_parked(server, 10)["bytes"] == 5 * 3 * 8  # the sparse pulls' ids
    del stray
    wait_parked(server, 0)
    # The rank's live connection was not touched: its rounds still complete.
    live.push(1, ones.data_ptr(), 4, _sgd(), 1).wait()
    got = torch.empty(4)
    live.pull(1, got.data_ptr(), 4, 1).wait()
    assert torch.equal(got, torch.full((4,), -0.5))


def test_parked_requests_per_connection_are_capped_with_a_clear_error():
    server = _C.PsServer(0, 1, num_shards=2, secret="s", max_parked_requests=4)
    c = _client(server)
    c.sparse_create(1, _C.SparseTableConfig(2, init=_C.SparseInit.ZEROS)).wait()
    zeros, ones = torch.zeros(4), torch.ones(4)  # alive while the native calls read them
    c.register_dense(2, 4, False, _sgd(), zeros.data_ptr(), 4).wait()
    ids, out, dense_out = torch.arange(8), torch.empty(8 * 2), torch.empty(4)
    parked = [c.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, 1) for _ in range(3)]
    parked.append(c.pull(2, dense_out.data_ptr(), 4, 1))
    wait_parked(server, 4)
    with pytest.raises(fastps.CapacityError, match=r"4 requests waiting.*the most one connection may park"):
        c.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, 1).wait()
    with pytest.raises(fastps.CapacityError, match="4 requests waiting"):
        c.pull(2, dense_out.data_ptr(), 4, 1).wait()
    other = _client(server)  # the cap is per connection
    late = other.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, 1)
    wait_parked(server, 5)
    # The refused requests changed nothing; completing the rounds answers the parked ones.
    g = torch.ones(8, 2)
    c.sparse_push(1, ids.data_ptr(), 8, 2, g.data_ptr(), 16, _C.SparseOptim(_C.SparseRule.SGD, lr=1.0), 1).wait()
    c.push(2, ones.data_ptr(), 4, _sgd(), 1).wait()
    for f in parked + [late]:
        f.wait()
    assert torch.equal(out, torch.full((16,), -1.0)) and torch.equal(dense_out, torch.full((4,), -0.5))
    wait_parked(server, 0)
    c.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, 1).wait()  # the connection still serves


def test_parked_bytes_per_connection_are_capped():
    server = _C.PsServer(0, 1, num_shards=2, secret="s", max_parked_bytes=100)
    c = _client(server)
    c.sparse_create(1, _C.SparseTableConfig(2)).wait()
    ids, out = torch.arange(16), torch.empty(16 * 2)
    first = c.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, FAR)  # 64 bytes of ids
    wait_parked(server, 1)
    with pytest.raises(fastps.CapacityError, match=r"hold 64 bytes.*\(64 bytes\).*100 bytes"):
        c.sparse_pull(1, ids.data_ptr(), 8, 2, out.data_ptr(), 16, FAR).wait()
    c.sparse_pull(1, ids.data_ptr(), 4, 2, out.data_ptr(), 8, FAR)  # 32 more fit
    assert wait_parked(server, 2)["bytes"] == 96
    assert not first.done()


def test_pushes_that_join_a_round_are_counted_but_never_refused():
    # A PUSH_PULL waits for its round with the worker's gradient already in it; it
    # is counted but not refused (refusing a piece after another shard applied it
    # would split the round, and a worker has at most one per key and round).
    # Requests that only read are refused past the cap.
    server = _C.PsServer(0, 2, num_shards=1, secret="s", max_parked_requests=1)
    a, b = _client(server, 0), _client(server, 1)
    z = torch.zeros(4)
    for key in (1, 2):
        a.register_dense(key, 4, True, _sgd(), z.data_ptr(), 4).wait()
        b.register_dense(key, 4, True, _sgd(), 0, 0).wait()
    ga, gb = torch.ones(4), torch.full((4,), 2.0)
    oa1, oa2, ob1, ob2 = (torch.empty(4) for _ in range(4))
    fa1 = a.push_pull(1, ga.data_ptr(), 4, oa1.data_ptr(), 4, 1)
    fa2 = a.push_pull(2, ga.data_ptr(), 4, oa2.data_ptr(), 4, 1)
    wait_parked(server, 2)  # past the cap of 1: both wait for b
    with pytest.raises(fastps.CapacityError, match="2 requests waiting"):
        a.pull(1, oa2.data_ptr(), 4, 1).wait()
    for f in [b.push_pull(1, gb.data_ptr(), 4, ob1.data_ptr(), 4, 1), b.push_pull(2, gb.data_ptr(), 4, ob2.data_ptr(), 4, 1)]:
        f.wait()
    fa1.wait()
    fa2.wait()
    for o in (oa1, oa2, ob1, ob2):
        assert torch.equal(o, torch.full((4,), 3.0))
    wait_parked(server, 0)


def test_limits_are_validated():
    with pytest.raises(fastps.InvalidArgumentError, match="max_parked_requests"):
        _C.PsServer(0, 1, secret="s", max_parked_requests=0)
    with pytest.raises(fastps.InvalidArgumentError, match="max_parked_bytes"):
        _C.PsServer(0, 1, secret="s", max_parked_bytes=-1)


def test_reading_an_unused_state_buffer_does_not_make_it():
    # STATE_GET of an optimizer-state buffer a chunk does not use (a sum-only chunk
    # has none) made the buffer, numel floats kept for good per 48-byte request.
    server = _C.PsServer(0, 1, num_shards=2, secret="s")
    c = _client(server)
    n = 8 << 20  # 32 MiB of float32
    init = torch.ones(n)
    c.register_dense(1, n, True, _sgd(), init.data_ptr(), n).wait()
    out = torch.empty(n)
    c.state_get(1, 0, out.data_ptr(), n).wait()  # warm up the reply path once
    before = _memory()[1]
    for buffer in (1, 2, 3):
        out.fill_(7.0)
        c.state_get(1, buffer, out.data_ptr(), n).wait()
        assert torch.equal(out, torch.zeros(n))
    grown = (_memory()[1] - before) >> 20
    assert grown < 48, f"reading 3 unused state buffers of 32 MiB kept {grown} MiB"
    c.state_get(1, 0, out.data_ptr(), n).wait()
    assert torch.equal(out, init)


def test_sparse_tables_per_server_are_capped():
    server = _C.PsServer(0, 1, num_shards=1, secret="s")
    c = _client(server)
    cfg = _C.SparseTableConfig(1)
    futures = [c.sparse_create(t, cfg) for t in range(4096)]
    for f in futures:
        f.wait()
    with pytest.raises(fastps.CapacityError, match="4096 sparse tables, the most one server may hold"):
        c.sparse_create(4096, cfg).wait()
    c.sparse_create(17, cfg).wait()  # an existing table is still created again (idempotent)
