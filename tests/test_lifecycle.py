"""How a distributed job ends: fatal errors end processes promptly, the rendezvous store's
waits and errors, and the warning about the job secret in the store."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist

import fastps
from fastps import _cluster, _config
from fastps._local_job import LocalJob, stop_sessions

WORKER = str(Path(__file__).with_name("lifecycle_worker.py"))


# -- a fatal error ends the survivor's process in seconds -------------------------------------

@pytest.mark.parametrize("killed", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["kill-rank1", "kill-rank0-store-host"])
def test_survivor_of_a_killed_rank_raises_a_typed_error_and_exits_promptly(tmp_path, killed):
    """SIGKILL one of two ranks mid-training: the other raises fastps.ConnectionError from
    step() and its process is gone within a few seconds of the kill, not after a shutdown
    barrier's deadline (FASTPS_TIMEOUT is 30 s here; the barrier used to wait that long)."""
    out = tmp_path / "res"
    env = {"FASTPS_TIMEOUT": "30", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with LocalJob(2, env=env, host_store=False) as job:  # rank 0 hosts the store: the case under test
        procs = [job.start(f"worker {r}", [sys.executable, WORKER, str(out)], rank=r,
                           stdout=f"{r}.out", stderr=f"{r}.err")
                 for r in range(2)]
        job.wait_for(lambda: all(Path(f"{out}.ready.{r}").exists() for r in range(2)), 60, "start of training")
        t0 = time.monotonic()
        os.kill(procs[killed].pid, signal.SIGKILL)
        survivor = procs[1 - killed]
        try:
            survivor.wait(timeout=25)
        except subprocess.TimeoutExpired:
            raise AssertionError("the survivor was still running 25 s after its peer was killed") from None
        elapsed = time.monotonic() - t0
        err = job.result(survivor).stderr
    assert survivor.returncode == 1, err[-3000:]
    assert "fastps.errors.ConnectionError" in err, err[-3000:]
    assert elapsed < 10.0, f"the survivor exited {elapsed:.1f} s after the kill:\n{err[-3000:]}"
    assert "FASTPS_SECRET" not in err  # loopback store: no warning about the secret


# -- store_get: deadlines, a dead store, a failed peer ------------------------------------------

class _RacyStore:
    """A store whose key lands exactly as a wait ends at the deadline: wait() times out
    and the key is there right after; check() finds it from the deadline on."""

    def __init__(self, lands_at: float) -> None:
        self.lands_at = lands_at
        self.landed = False

    def _present(self) -> bool:
        return self.landed or time.monotonic() >= self.lands_at

    def wait(self, keys, timeout: datetime.timedelta) -> None:
        time.sleep(timeout.total_seconds())
        self.landed = True
        raise dist.DistStoreError("wait timeout")

    def check(self, keys) -> bool:
        return keys == ["k"] and self._present()

    def get(self, key: str) -> bytes:
        assert key == "k" and self._present()
        return b"v"


def test_store_get_returns_a_key_that_lands_as_its_deadline_ends():
    timeout = 0.3
    store = _RacyStore(time.monotonic() + timeout)
    assert _cluster.store_get(store, "k", timeout, "the racy key") == b"v"


def test_store_get_times_out_naming_what_it_waited_for():
    store = dist.PrefixStore("fastps/0/", dist.HashStore())
    t0 = time.monotonic()
    with pytest.raises(fastps.TimeoutError, match="parameter server 3 to start"):
        _cluster.store_get(store, "server/3", 0.3, "parameter server 3 to start")
    assert 0.3 <= time.monotonic() - t0 < 5.0


def test_store_get_stops_when_another_rank_published_its_failure():
    store = dist.PrefixStore("fastps/0/", dist.HashStore())
    threading.Timer(0.2, lambda: store.set(_cluster.FAILED_KEY, b"rank 1 failed (ConnectionError: x)")).start()
    t0 = time.monotonic()
    with pytest.raises(fastps.ConnectionError, match=r"every rank to finish: rank 1 failed \(ConnectionError"):
        _cluster.store_barrier(store, "shutdown", 2, 30.0, "every rank to finish")
    assert time.monotonic() - t0 < 5.0  # not the 30 s deadline


def test_store_get_raises_connection_error_at_once_when_the_store_host_dies():
    host = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, torch.distributed as d\n"
         "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, multi_tenant=True)\n"
         "print(s.port, flush=True)\n"  # a port the OS chose and the store holds
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        port = int(host.stdout.readline())
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
        store = dist.PrefixStore("fastps/0/", client)
        threading.Timer(0.3, host.kill).start()
        t0 = time.monotonic()
        with pytest.raises(fastps.ConnectionError, match=f"rendezvous store at 127.0.0.1:{port}.*rank 0 to"):
            _cluster.store_get(store, "secret", 10.0, "rank 0 to publish the job secret", where=f"127.0.0.1:{port}")
        assert time.monotonic() - t0 < 5.0  # not the 10 s deadline
    finally:
        stop_sessions([host])
        host.communicate()


def test_the_store_host_stays_until_every_rank_saw_the_shutdown_barrier_end(monkeypatch):
    """Rank 0 hosts the store (no torchrun agent): after the shutdown barrier it must not take
    the store away before the other ranks, polling, have seen the barrier end."""
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    port = host.port
    peer = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))

    class Rank:
        def __init__(self, rank: int, store) -> None:
            self.config = _cluster.ClusterConfig(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port)
            self.rank, self.world_size = rank, 2
            self.store = dist.PrefixStore("fastps/0/", store)
            self.store_addr = f"127.0.0.1:{port}"

        def leave(self) -> None:
            _cluster.store_barrier(self.store, "shutdown", 2, 10.0, "every rank to finish")
            _cluster.Cluster._leave_store(self)

    left = {}

    def slow_peer() -> None:
        r = Rank(1, peer)
        _cluster.store_barrier(r.store, "shutdown", 2, 10.0, "every rank to finish")
        time.sleep(0.3)  # still between its polls when the host is done
        left[1] = time.monotonic()
        _cluster.Cluster._leave_store(r)

    t = threading.Thread(target=slow_peer)
    t.start()
    Rank(0, host).leave()
    left[0] = time.monotonic()
    t.join(10)
    assert left[0] >= left[1], "the store's host left before the other rank had seen the barrier end"


# -- the job secret in the store ----------------------------------------------------------------

def _cfg(addr: str, port: int = 29500) -> _cluster.ClusterConfig:
    return _cluster.ClusterConfig(rank=0, world_size=1, master_addr=addr, master_port=port)


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost", "::1", "127.0.1.1"])
def test_no_secret_warning_for_a_loopback_store(monkeypatch, addr):
    monkeypatch.setattr(_cluster, "_warned_secret", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cluster.warn_if_secret_exposed(_cfg(addr))


def test_secret_warning_for_a_store_other_hosts_reach_once(monkeypatch):
    monkeypatch.setattr(_cluster, "_warned_secret", False)
    with pytest.warns(UserWarning, match=r"FASTPS_SECRET is not set.*10\.1\.2\.3:29500.*without authentication"):
        _cluster.warn_if_secret_exposed(_cfg("10.1.2.3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cluster.warn_if_secret_exposed(_cfg("10.1.2.3"))  # once per process


def _this_hosts_address() -> str:
    """A non-loopback address of this machine (where the route to a documentation address
    leaves), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            addr = s.getsockname()[0]
        except OSError:
            addr = ""
    if not addr or addr.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    return addr


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_rank0_warns_when_it_publishes_the_secret_beyond_loopback(monkeypatch, secret):
    """A one-rank Cluster whose store is at this host's network address: rank 0 warns when it
    generates the secret, not when FASTPS_SECRET is set."""
    monkeypatch.setattr(_cluster, "_warned_secret", False)
    monkeypatch.setattr(_cluster.atexit, "register", lambda fn: None)
    if secret is None:
        monkeypatch.delenv("FASTPS_SECRET", raising=False)
    else:
        monkeypatch.setenv("FASTPS_SECRET", secret)
    addr = _this_hosts_address()
    # the settings as the distributed mode resolves them (FASTPS_SECRET included)
    cfg = _cluster.ClusterConfig(rank=0, world_size=1, master_addr=addr, master_port=_cluster.free_port(),
                                 **_config.resolve_all(overrides=dict(timeout=10.0)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cl = _cluster.Cluster(cfg)
    try:
        messages = [str(w.message) for w in seen if "FASTPS_SECRET" in str(w.message)]
        assert len(messages) == (1 if secret is None else 0), messages
    finally:
        cl.shutdown()
