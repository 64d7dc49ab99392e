"""``fastps demo``: start a local data-parallel job of the GPT demo and report on it.

Spawns ``--workers`` processes of :mod:`fastps.demo.train` with the environment
torchrun would give them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``; rank 0 hosts the rendezvous
store), plus ``--servers`` dedicated ``python -m fastps server`` processes.
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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .._cluster import TRANSPORTS
from .._local_job import job_env, rank_env, stop_sessions
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


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the launcher dies (Linux), so no orphan keeps running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the launcher's own cleanup still applies
        pass


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


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class Job:
    """One local job: workers (rank 0 on this terminal, the others logging to files) and servers."""

    def __init__(self, args: argparse.Namespace, backend: str, logdir: str) -> None:
        self.procs: List[subprocess.Popen] = []
        self.names: List[str] = []
        self.logs: List[Optional[Path]] = []
        self.files = []
        self.run_dir = Path(logdir) / backend
        self.run_dir.mkdir(parents=True, exist_ok=True)
        workers = args.workers
        env = job_env(workers)
        threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
        env.update({
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "FASTPS_STALENESS": str(MODES[args.mode]), "FASTPS_TRANSPORT": args.transport,
        })
        servers = args.servers if backend == "fastps" and workers > 1 else 0
        if servers:
            env.update({"FASTPS_COLOCATE": "0", "FASTPS_NUM_SERVERS": str(servers)})
        else:
            env.pop("FASTPS_NUM_SERVERS", None)
            env.pop("FASTPS_COLOCATE", None)
        argv = training_argv(args, backend, logdir)
        try:
            for r in range(workers):
                log = None if r == 0 else self.run_dir / f"worker{r}.log"
                self._spawn(f"{backend} worker {r}", [sys.executable, "-m", "fastps.demo.train"] + argv,
                            rank_env(env, r), log)
            for i in range(servers):
                self._spawn(f"fastps server {i}", [sys.executable, "-m", "fastps", "server"], env,
                            self.run_dir / f"server{i}.log")
        except BaseException:
            self.kill()
            raise

    def _spawn(self, name: str, cmd: List[str], env: Dict[str, str], log: Optional[Path]) -> None:
        out = None
        if log is not None:
            out = open(log, "w")
            self.files.append(out)
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           preexec_fn=_set_pdeathsig))
        self.names.append(name)
        self.logs.append(log)

    def wait(self, timeout: float) -> None:
        """Wait for every worker to exit 0 (servers then leave by themselves); raise DemoError
        naming the first process that failed, or on timeout."""
        deadline = time.monotonic() + timeout
        nworkers = sum(1 for n in self.names if "worker" in n)
        while True:
            codes = [p.poll() for p in self.procs]
            for name, code, log in zip(self.names, codes, self.logs):
                if code not in (None, 0):
                    where = f"; its log ({log}):\n{_tail(log)}" if log else " (its output is above)"
                    raise DemoError(f"{name} exited with status {code}{where}")
            if all(c == 0 for c in codes[:nworkers]):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"the job did not finish within --timeout {timeout:.0f}s")
            time.sleep(0.1)
        # Dedicated servers exit once every worker has left; give them a moment.
        end = time.monotonic() + 15
        while time.monotonic() < end and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)

    def kill(self) -> None:
        """Stop every process still running: SIGTERM to its session, then SIGKILL after 5 s."""
        stop_sessions(self.procs, grace=5.0)
        for f in self.files:
            f.close()
        self.files = []

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


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

    def _terminated(signum, frame):  # SIGTERM: leave through the same cleanup as Ctrl-C
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _terminated)
    try:
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
    finally:
        signal.signal(signal.SIGTERM, old)
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
