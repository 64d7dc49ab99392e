"""The one launcher of local jobs (fastps/_local_job.py): fail-fast, deadlines, the ranks'
environment and the rendezvous port held from the moment the job exists."""

from __future__ import annotations

import datetime
import errno
import socket
import sys
import time

import pytest
import torch.distributed as dist

import fastps
from fastps._local_job import STDOUT, JobFailed, JobTimedOut, LocalJob, poll_until

PY = sys.executable


def test_the_rendezvous_port_is_bound_before_any_rank_starts():
    """No window in which another process can take the port (Note [Local job's rendezvous
    port]): the launcher's store holds it, and ranks reach that store as torchrun's agent's."""
    with LocalJob(2) as job:
        with socket.socket() as s, pytest.raises(OSError) as e:
            s.bind(("127.0.0.1", job.port))
        assert e.value.errno == errno.EADDRINUSE
        assert job.env["MASTER_PORT"] == str(job.port) and job.env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        client = dist.TCPStore("127.0.0.1", job.port, is_master=False, timeout=datetime.timedelta(seconds=10))
        client.set("k", "v")  # the store the ranks will use answers


def test_ranks_get_torchruns_variables():
    code = "import os; print(*(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR')))"
    with LocalJob(2) as job:
        for r in range(2):
            job.start(f"worker {r}", [PY, "-c", code], rank=r, stdout=f"{r}.out")
        results = job.wait(60)
    assert [r.stdout.split() for r in results] == [["0", "0", "2", "127.0.0.1"], ["1", "1", "2", "127.0.0.1"]]


def test_a_failed_rank_stops_the_others_and_is_named_with_its_output():
    with LocalJob(2) as job:
        sleeper = job.start("worker 0", [PY, "-c", "import time; time.sleep(120)"], rank=0)
        job.start("worker 1", [PY, "-c", "import sys; print('boom at step 3', file=sys.stderr); sys.exit(3)"],
                  rank=1, stdout="1.log", stderr=STDOUT)
        t0 = time.monotonic()
        with pytest.raises(JobFailed) as e:
            job.wait(60)
        assert time.monotonic() - t0 < 30  # at once, not at the deadline
        assert sleeper.poll() is not None  # the others were stopped
    assert (e.value.name, e.value.rank, e.value.returncode) == ("worker 1", 1, 3)
    assert str(e.value) == "worker 1 exited with code 3" and "boom at step 3" in e.value.tail


def test_a_rank_killed_by_a_signal_is_named_with_the_signal():
    with LocalJob(1) as job:
        job.start("worker 0", [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], rank=0)
        with pytest.raises(JobFailed, match="worker 0 was killed by SIGKILL"):
            job.wait(60)


def test_the_deadline_stops_every_process():
    with LocalJob(1) as job:
        p = job.start("worker 0", [PY, "-c", "import time; time.sleep(120)"], rank=0)
        with pytest.raises(JobTimedOut, match="did not finish within 1 s") as e:
            job.wait(1)
        assert p.poll() is not None and e.value.name == "worker 0"


def test_without_fail_fast_every_result_is_returned():
    with LocalJob(2) as job:
        job.start("worker 0", [PY, "-c", "import time; time.sleep(1)"], rank=0)
        job.start("worker 1", [PY, "-c", "raise SystemExit(9)"], rank=1)
        results = job.wait(60, fail_fast=False)
    assert [r.returncode for r in results] == [0, 9]


def test_wait_for_fails_at_once_when_a_process_exits_first():
    with LocalJob(1) as job:
        job.start("worker 0", [PY, "-c", "import sys; sys.exit('no data')"], rank=0, stderr="0.err")
        with pytest.raises(JobFailed, match=r"worker 0 exited with code 1 before start of training(.|\n)*no data"):
            job.wait_for(lambda: False, 60, "start of training")


def test_poll_until_says_what_it_waited_for_and_what_it_saw():
    with pytest.raises(fastps.TimeoutError, match=r"waiting for the key \(seen: 3 keys\)"):
        poll_until(lambda: False, 0.05, "the key", state=lambda: "3 keys")
    poll_until(lambda: True, 0, "nothing")  # ready at the deadline: no error
