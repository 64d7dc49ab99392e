"""The shared-memory path of the transport (csrc/transport/shm.h): selection,
fallback, forced modes, large frames through small rings, cleanup of /dev/shm.

Server and client live in this process here (shared memory works within one
host, so also within one process); tests/test_distributed.py runs whole jobs
over it (FASTPS_TRANSPORT defaults to auto).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastps
from fastps import _C, _cluster

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")


def _segments(pid: int = os.getpid()):
    return sorted(p.name for p in SHM.glob(f"fastps-{pid}-*"))


def _pair(server_transport="auto", client_transport="auto", ring=4 << 20, chunk=4096):
    server = _C.PsServer(0, 1, secret="s", transport=server_transport)
    client = _C.PsClient(0, secret="s", timeout_s=10, chunk_bytes=chunk, transport=client_transport,
                         shm_ring_bytes=ring)
    client.connect([("127.0.0.1", server.port)])
    return server, client


def _sgd_roundtrip(client, n, tid=1):
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    h.lr = 0.5
    p = torch.randn(n)
    client.register_dense(tid, n, False, h, p.data_ptr(), p.numel()).wait()
    g = torch.randn(n)
    client.push(tid, g.data_ptr(), g.numel(), h, 1).wait()
    out = torch.empty(n)
    client.pull(tid, out.data_ptr(), out.numel(), 1).wait()
    torch.testing.assert_close(out, p - 0.5 * g, rtol=0, atol=0)


def test_same_host_connection_uses_shared_memory_and_leaves_no_names():
    server, client = _pair()
    assert client.server_paths() == ["shm"]
    assert _segments() == []  # unlinked as soon as the server mapped it
    _sgd_roundtrip(client, 3000)
    del client, server


def test_spin_and_yield_are_options_of_both_ends():
    # FASTPS_SHM_SPIN_US / FASTPS_SHM_YIELD_US reach the core as these keywords
    # (-1: the default); the core reads no environment variable itself.
    server = _C.PsServer(0, 1, secret="s", transport="auto", shm_spin_us=30, shm_yield_us=10)
    client = _C.PsClient(0, secret="s", timeout_s=10, chunk_bytes=4096, transport="shm",
                         shm_spin_us=0, shm_yield_us=50)
    client.connect([("127.0.0.1", server.port)])
    assert client.server_paths() == ["shm"]
    _sgd_roundtrip(client, 3000)
    del client, server
    with pytest.raises(fastps.InvalidArgumentError, match="shm_spin_us"):
        _C.PsClient(0, transport="shm", shm_spin_us=-5)
    with pytest.raises(fastps.InvalidArgumentError, match="shm_yield_us"):
        _C.PsServer(0, 1, transport="auto", shm_yield_us=10**9)


def test_frames_larger_than_the_ring_stream_through_it():
    # 64 KiB rings, 4 MiB chunks: every frame wraps around the ring many times.
    server, client = _pair(ring=64 << 10, chunk=4 << 20)
    assert client.server_paths() == ["shm"]
    _sgd_roundtrip(client, 3 << 20)  # 12 MiB in 3 chunks
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    src = torch.arange(1 << 20, dtype=torch.float32)
    client.register_dense(2, 1 << 20, True, h, src.data_ptr(), src.numel()).wait()
    out = torch.empty(1 << 20)
    client.push_pull(2, src.data_ptr(), src.numel(), out.data_ptr(), out.numel(), 1).wait()
    assert torch.equal(out, src)  # one worker: the sum is its own push


@pytest.mark.parametrize("server_t,client_t", [("auto", "tcp"), ("tcp", "auto")])
def test_tcp_when_either_side_says_tcp(server_t, client_t):
    server, client = _pair(server_t, client_t)
    assert client.server_paths() == ["tcp"]
    _sgd_roundtrip(client, 3000)


def test_forced_shm_that_the_server_declines_is_a_connection_error():
    server = _C.PsServer(0, 1, secret="s", transport="tcp")
    client = _C.PsClient(0, secret="s", timeout_s=5, transport="shm")
    with pytest.raises(fastps.ConnectionError, match="shared memory.*TCP only"):
        client.connect([("127.0.0.1", server.port)])
    assert _segments() == []


def test_unknown_transport_names_are_rejected(monkeypatch):
    with pytest.raises(fastps.InvalidArgumentError, match="'auto'.*'tcp'.*'shm'"):
        _C.PsClient(0, transport="udp")
    with pytest.raises(fastps.InvalidArgumentError, match="'auto'.*'tcp'.*'shm'"):
        _C.PsServer(0, 1, transport="udp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("FASTPS_TRANSPORT", "rdma")
    with pytest.raises(fastps.InvalidArgumentError, match="FASTPS_TRANSPORT"):
        _cluster.config_from_env()


def test_segments_of_dead_processes_are_swept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    stale = SHM / f"fastps-{pid}-00000000deadbeef"
    stale.write_bytes(b"\0" * 4096)
    try:
        # A fresh process sweeps once, when it creates its first segment.
        code = ("from fastps import _C\n"
                "s = _C.PsServer(0, 1, secret='s')\n"
                "c = _C.PsClient(0, secret='s', timeout_s=10)\n"
                "c.connect([('127.0.0.1', s.port)])\n"
                "assert c.server_paths() == ['shm'], c.server_paths()\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_killed_server_process_fails_a_waiting_request_quickly(tmp_path):
    code = ("import sys, time\nfrom fastps import _C\n"
            "s = _C.PsServer(0, 2, secret='s')\n"  # 2 workers: a BSP round never completes alone
            "print(s.port, flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = _C.PsClient(0, secret="s", timeout_s=30, chunk_bytes=4096)
        client.connect([("127.0.0.1", port)])
        assert client.server_paths() == ["shm"]
        h = _C.OptimHyper()
        h.kind = _C.OptimKind.SGD
        p = torch.zeros(5000)
        client.register_dense(1, 5000, False, h, p.data_ptr(), p.numel()).wait()
        client.push(1, p.data_ptr(), p.numel(), h, 1).wait()
        fut = client.pull(1, p.data_ptr(), p.numel(), 1)  # the round needs the second worker's push
        proc.kill()
        t0 = time.monotonic()
        with pytest.raises((fastps.ConnectionError, fastps.TimeoutError)):
            fut.wait()
        assert time.monotonic() - t0 < 10
        assert _segments(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
