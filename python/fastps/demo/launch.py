"""``fastps demo``: start a local data-parallel job of the GPT demo and report on it.

Spawns ``--workers`` processes of :mod:`fastps.demo.train` with the environment
torchrun would give them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``; the launcher hosts the rendezvous
store, as torchrun's agent does: see fastps/_local_job.py), plus ``--servers``
dedicated ``python -m fastps server`` processes.
With ``--compare ddp`` the same training runs again as a torch DDP job. Then it
prints the summary table, the agreement of the two loss curves, and a sample
of generated code, and writes the loss plot.

Every child runs in its own session and is killed (SIGTERM, then SIGKILL) when
the launcher leaves for any reason: success, error, Ctrl-C or timeout; on
Linux the children also get SIGTERM if the launcher itself is killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .._cluster import TRANSPORTS
from .._local_job import INHERIT, STDOUT, JobFailed, JobHandle, JobTimedOut, LocalJob, interrupt_on_signals
from .train import add_training_arguments, build_parser, default_logdir, find_resume_logdir

MODES = {"bsp": 0, "ssp": 2, "asp": -1}


class DemoError(RuntimeError):
    """A job failed; the message says which process and shows its log's tail."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastps demo`` flags (the launcher's, then the training script's)."""
    j = p.add_argument_group("job")
    j.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    j.add_argument("--servers", type=int, default=0,
                   help="dedicated `fastps server` processes; 0 (default): one server colocated with "
                        "each worker")
    j.add_argument("--mode", choices=sorted(MODES), default="bsp",
                   help="consistency: bsp (default), ssp (staleness 2) or asp")
    j.add_argument("--transport", default="auto", choices=TRANSPORTS,
                   help="worker-server transport (FASTPS_TRANSPORT): auto (default) uses shared memory "
                        "between the processes of this machine, tcp sockets only, shm insists on shared memory")
    j.add_argument("--compare", choices=["ddp"], default=None,
                   help="also train the same model, data and seed with torch DDP (gloo) and compare")
    j.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: cores / workers, at least 1)")
    j.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds a job may run before it is killed (default 3600)")
    add_training_arguments(p)


def training_argv(args: argparse.Namespace, backend: str, logdir: str) -> List[str]:
    """The training script's command line for ``backend``, from the demo's parsed flags."""
    out = ["--backend", backend, "--logdir", logdir, "--no-report"]
    for action in build_parser()._actions:
        dest = action.dest
        if dest in ("help", "backend", "logdir", "no_report") or not action.option_strings:
            continue
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = action.option_strings[-1]
        out += [flag] if value is True else [flag, str(value)]
    return out


class Job(JobHandle):
    """One local job: workers (rank 0 on this terminal, the others logging to files) and servers,
    run by the shared launcher (:class:`fastps._local_job.LocalJob`)."""

    def __init__(self, args: argparse.Namespace, backend: str, logdir: str) -> None:
        run_dir = Path(logdir) / backend
        workers = args.workers
        threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
        env = {
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "FASTPS_STALENESS": str(MODES[args.mode]), "FASTPS_TRANSPORT": args.transport,
        }
        servers = args.servers if backend == "fastps" and workers > 1 else 0
        self.job = LocalJob(workers, env=env, log_dir=run_dir, grace=5.0, die_with_launcher=True)
        try:
            if servers:
                self.job.env.update({"FASTPS_COLOCATE": "0", "FASTPS_NUM_SERVERS": str(servers)})
            else:
                self.job.env.pop("FASTPS_NUM_SERVERS", None)
                self.job.env.pop("FASTPS_COLOCATE", None)
            argv = training_argv(args, backend, logdir)
            self.workers = []
            for r in range(workers):
                log = INHERIT if r == 0 else f"worker{r}.log"
                self.workers.append(self.job.start(
                    f"{backend} worker {r}", [sys.executable, "-m", "fastps.demo.train"] + argv, rank=r,
                    stdout=log, stderr=STDOUT if log else INHERIT))
            for i in range(servers):
                self.job.start(f"fastps server {i}", [sys.executable, "-m", "fastps", "server"],
                               stdout=f"server{i}.log", stderr=STDOUT)
        except BaseException:
            self.job.close()
            raise

    def wait(self, timeout: float) -> None:
        """Wait for every worker to exit 0 (servers then leave by themselves); raise DemoError
        naming the first process that failed, or on timeout."""
        try:
            # Dedicated servers exit once every worker has left; give them a moment.
            self.job.wait(timeout, until=self.workers, linger=15.0)
        except JobTimedOut:
            raise DemoError(f"the job did not finish within --timeout {timeout:.0f}s") from None
        except JobFailed as e:
            where = f"; its log ({e.log}):\n{e.tail}" if e.log else " (its output is above)"
            raise DemoError(f"{e.name} exited with status {e.returncode}{where}") from None



def check(args: argparse.Namespace) -> Optional[str]:
    """A message for the first invalid launcher setting, or None."""
    if args.transport not in TRANSPORTS:
        return f"--transport must be one of {', '.join(TRANSPORTS)}, got {args.transport!r}"
    if args.workers < 1:
        return "--workers must be >= 1"
    if args.servers < 0:
        return "--servers must be >= 0"
    if args.servers and args.workers < 2:
        return "--servers needs --workers >= 2 (one worker trains in-process, without servers)"
    if args.timeout <= 0:
        return "--timeout must be > 0"
    from .train import check_arguments

    return check_arguments(args, args.workers)


def run(args: argparse.Namespace) -> int:
    """Run the demo described by the parsed ``fastps demo`` flags; returns the exit status."""
    err = check(args)
    if err:
        print(f"fastps demo: {err}", file=sys.stderr)
        return 2
    logdir = args.logdir
    if args.resume and not logdir:
        logdir = find_resume_logdir("fastps")
        if logdir is None:
            print("fastps demo: --resume: no runs/*/fastps/ckpt.pt found; starting from step 0", flush=True)
    logdir = logdir or default_logdir()
    backends = ["fastps"] + ([args.compare] if args.compare else [])
    # Each run continues from its checkpoint when there is one (fastps.demo.train).
    resuming = [b for b in backends if not args.no_resume and (Path(logdir) / b / "ckpt.pt").exists()]
    Path(logdir).mkdir(parents=True, exist_ok=True)
    servers = (f"{args.servers} dedicated server(s)" if args.servers else
               f"{args.workers} colocated server(s)") if args.workers > 1 else "embedded server"
    print(f"fastps demo: {args.workers} worker(s), {servers}, {args.mode.upper()}, transport "
          f"{args.transport}; logs in {logdir}"
          + (f"; continuing from the checkpoint of {', '.join(resuming)} (--no-resume starts over)"
             if resuming else ""), flush=True)
    t0 = time.perf_counter()

    try:
        with interrupt_on_signals():  # SIGTERM: leave through the same cleanup as Ctrl-C
            for backend in backends:
                t = time.perf_counter()
                with Job(args, backend, logdir) as job:
                    job.wait(args.timeout)
                print(f"[{backend}] job finished in {time.perf_counter() - t:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("\nfastps demo: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"fastps demo: {e}", file=sys.stderr)
        return 1
    if args.stop_after is not None and args.stop_after < args.steps:
        how = (f"continue with `fastps demo --logdir {logdir}` and the same flags (it resumes from the "
               "checkpoint)" if args.save_every else "no checkpoint was written (--save-every)")
        print(f"fastps demo: stopped after step {args.stop_after} of {args.steps}; {how}", flush=True)
    from . import report

    report.finish(Path(logdir), stream=sys.stdout)
    sample = report.read_run(Path(logdir) / "fastps")
    if sample is not None and sample.sample:
        print(f"\nsample from the fastps model (prompt {args.prompt!r}, temperature 0.8):\n"
              f"{'-' * 60}\n{sample.sample}\n{'-' * 60}")
    print(f"fastps demo: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
