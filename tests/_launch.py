"""Start real multi-process fastps jobs on 127.0.0.1 for tests, and always clean up.

Like ps-lite's ``local.sh 2 2`` inside pytest: N worker processes with the
environment torchrun would give them (rank 0 hosts the rendezvous store on an
ephemeral port), plus optional dedicated ``fastps server`` processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from fastps._local_job import job_env, rank_env, stop_sessions

WORKER = str(Path(__file__).with_name("dist_worker.py"))


class Job:
    """A running job. Use as a context manager: every process is killed on exit."""

    def __init__(self, workers: int, args: List[str], *, servers: int = 0,
                 env: Optional[Dict[str, str]] = None, timeout: float = 60.0, worker: str = WORKER) -> None:
        self.timeout = timeout
        base = job_env(workers)
        self.port = int(base["MASTER_PORT"])
        base.update({"FASTPS_TIMEOUT": "30", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        if servers:
            base.update({"FASTPS_COLOCATE": "0", "FASTPS_NUM_SERVERS": str(servers)})
        base.update(env or {})
        self.workers: List[subprocess.Popen] = []
        self.servers: List[subprocess.Popen] = []
        for r in range(workers):
            self.workers.append(subprocess.Popen([sys.executable, worker] + args, env=rank_env(base, r),
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, start_new_session=True))
        for _ in range(servers):
            self.servers.append(subprocess.Popen([sys.executable, "-m", "fastps", "server"], env=base,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, start_new_session=True))

    def wait(self) -> List[subprocess.CompletedProcess]:
        """Wait for the workers (bounded); return their results."""
        deadline = time.monotonic() + self.timeout
        out = []
        for p in self.workers:
            try:
                so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                so, se = p.communicate()
                raise AssertionError(f"worker hung past {self.timeout}s; stderr:\n{se[-3000:]}")
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
        return out

    def wait_ready(self, out, timeout: float = 60.0) -> None:
        """Wait until every worker wrote `out.ready.RANK` (dist_worker's train_until_failure);
        a worker that exits first fails the test with its stderr."""
        deadline = time.monotonic() + timeout
        while not all(Path(f"{out}.ready.{r}").exists() for r in range(len(self.workers))):
            assert time.monotonic() < deadline, "training did not start"
            for p in self.workers:
                assert p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.1)

    def kill(self) -> None:
        stop_sessions(self.workers + self.servers)
        for p in self.workers + self.servers:
            try:
                p.communicate(timeout=10)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def check(results: List[subprocess.CompletedProcess]) -> None:
    for r, res in enumerate(results):
        assert res.returncode == 0, f"worker {r} exited {res.returncode}:\n{res.stderr[-4000:]}"
