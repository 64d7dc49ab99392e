"""Start real multi-process fastps jobs on 127.0.0.1 for tests, and always clean up.

Like ps-lite's ``local.sh 2 2`` inside pytest: N worker processes with the
environment torchrun would give them, plus optional dedicated ``fastps server``
processes, run by the launcher the demo and the benchmarks use
(:class:`fastps._local_job.LocalJob`, which hosts the rendezvous store on a port
the OS picked, so no port can be taken between choosing and binding it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from fastps._local_job import JobFailed, JobHandle, LocalJob

WORKER = str(Path(__file__).with_name("dist_worker.py"))


class Job(JobHandle):
    """A running job. Use as a context manager: every process is killed on exit.

    ``workers`` and ``servers`` are the processes (``subprocess.Popen``); their
    output goes to files, read back by :meth:`wait` and :meth:`result`.
    """

    def __init__(self, workers: int, args: List[str], *, servers: int = 0,
                 env: Optional[Dict[str, str]] = None, timeout: float = 60.0, worker: str = WORKER) -> None:
        self.timeout = timeout
        base = {"FASTPS_TIMEOUT": "30", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if servers:
            base.update({"FASTPS_COLOCATE": "0", "FASTPS_NUM_SERVERS": str(servers)})
        base.update(env or {})
        self.job = LocalJob(workers, env=base)
        self.port = self.job.port
        try:
            self.workers = [self.job.start(f"worker {r}", [sys.executable, worker] + args, rank=r,
                                           stdout=f"worker{r}.out", stderr=f"worker{r}.err")
                            for r in range(workers)]
            self.servers = [self.job.start(f"server {i}", [sys.executable, "-m", "fastps", "server"],
                                           stdout=f"server{i}.out", stderr=f"server{i}.err")
                            for i in range(servers)]
        except BaseException:
            self.job.close()
            raise

    def wait(self) -> List[subprocess.CompletedProcess]:
        """Wait for the workers (bounded by ``timeout``); return their results, failed or not."""
        try:
            results = self.job.wait(self.timeout, until=self.workers, fail_fast=False)
        except JobFailed as e:
            raise AssertionError(f"{e.name} hung past {self.timeout}s; stderr:\n{e.tail[-3000:]}") from None
        return [subprocess.CompletedProcess(r.args, r.returncode, r.stdout, r.stderr)
                for r in results[:len(self.workers)]]

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ``ready()`` until true; a process that exits first, or the deadline, fails
        the test with a message naming ``what`` (and the process, with its error output)."""
        try:
            self.job.wait_for(ready, timeout, what)
        except JobFailed as e:
            raise AssertionError(str(e)) from None

    def wait_ready(self, out, timeout: float = 60.0) -> None:
        """Wait until every worker wrote `out.ready.RANK` (dist_worker's train_until_failure)."""
        n = len(self.workers)
        self.wait_for(lambda: all(Path(f"{out}.ready.{r}").exists() for r in range(n)), "start of training",
                      timeout)

    def signal_server_once_training(self, out, index: int, signum: int
                                    ) -> Tuple[List[subprocess.CompletedProcess], float]:
        """Once every worker trains (``wait_ready``), send ``signum`` to server ``index``
        (SIGKILL: a dead peer; SIGSTOP: a frozen one); return the workers' results and the
        seconds from the signal until the last worker exited."""
        self.wait_ready(out)
        t0 = time.monotonic()
        os.kill(self.servers[index].pid, signum)
        results = self.wait()
        return results, time.monotonic() - t0

    def result(self, proc: subprocess.Popen) -> subprocess.CompletedProcess:
        """The result of one process that has exited (its output files as they are now)."""
        r = self.job.result(proc)
        return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, r.stderr)



def failures(out, results: List[subprocess.CompletedProcess]) -> List[Tuple[str, float, str]]:
    """(exception type, seconds until it was raised, message) per worker of a
    dist_worker ``slow`` run whose workers all failed (exit code 3, as written to OUT.RANK)."""
    records = []
    for r, res in enumerate(results):
        assert res.returncode == 3, res.stderr[-3000:]
        kind, delay, msg = Path(f"{out}.{r}").read_text().split("\n", 2)
        records.append((kind, float(delay), msg))
    return records


def check(results: List[subprocess.CompletedProcess]) -> None:
    for r, res in enumerate(results):
        assert res.returncode == 0, f"worker {r} exited {res.returncode}:\n{res.stderr[-4000:]}"
