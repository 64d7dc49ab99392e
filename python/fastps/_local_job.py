"""The one launcher of one-host jobs: ``fastps demo``, ``fastps bench allreduce``, the tests.

They start worker (and server) processes themselves instead of through
torchrun, through :class:`LocalJob`: it gives every rank the environment
torchrun would (:func:`job_env`, :func:`rank_env`), starts each process in a
session of its own, polls them, stops them all as soon as one fails (naming it,
its exit status and the tail of its output), on Ctrl-C and at a deadline, and
stops whole sessions when it leaves (:func:`stop_sessions`), so no child or
grandchild outlives its launcher.

Note [Local job's rendezvous port]
A port picked by binding port 0 and closing the socket (``free_port``) is free
only at that moment: until rank 0 binds it again, any other process may take it,
and the job then fails with "address already in use". :class:`LocalJob` does what
torchrun does instead: the launcher itself hosts the job's ``TCPStore``, created on
port 0 (the OS picks a free port and the store keeps it bound for the whole job),
and tells the ranks, as torchrun's agent does, with ``MASTER_PORT`` and
``TORCHELASTIC_USE_AGENT_STORE=True``: every rank, fastps's rendezvous
(fastps/_cluster.py) and torch's ``env://`` alike, then connects as a client. No
port is ever chosen before it is bound, and the worker programs need no change.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from ._cluster import free_port
from .errors import FastPSError
from .errors import TimeoutError as FastPSTimeoutError

# start()'s output destinations besides a file name.
INHERIT = None        # this process's own stdout/stderr (the terminal)
STDOUT = "<stdout>"   # stderr only: into the same file as stdout


def job_env(world_size: int, base: Optional[Mapping[str, str]] = None, *,
            port: Optional[int] = None) -> Dict[str, str]:
    """The environment shared by every rank of a one-host job of ``world_size`` workers whose
    rank 0 hosts the rendezvous store (:class:`LocalJob` hosts it itself instead).

    ``base`` (default: this process's environment) plus ``MASTER_ADDR=127.0.0.1``,
    ``MASTER_PORT`` (``port``, or one free now: see Note [Local job's rendezvous port]
    for why that can race), ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``. ``TORCHELASTIC_*``
    variables are dropped: the job is not run by a torchrun agent, so its rank 0 hosts
    the rendezvous store itself (fastps/_cluster.py).
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("TORCHELASTIC_")}
    env.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port if port is not None else free_port()),
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
    })
    return env


def rank_env(env: Mapping[str, str], rank: int) -> Dict[str, str]:
    """``env`` with the per-rank variables of worker ``rank`` (``RANK``, ``LOCAL_RANK``)."""
    return dict(env, RANK=str(rank), LOCAL_RANK=str(rank))


def stop_sessions(procs: Sequence[subprocess.Popen], grace: float = 0.0) -> None:
    """Stop every process of ``procs`` still running, with its whole session, and reap it.

    Each process must have been started with ``start_new_session=True``. With
    ``grace`` > 0 the sessions get SIGTERM first and that many seconds (in all)
    to exit; whatever is left then, or everything when ``grace`` is 0, gets
    SIGKILL. Returns when every process has exited (waiting at most 10 s for
    each after SIGKILL).
    """
    def signal_all(sig: int) -> None:
        # Every session, also one whose leader has exited: its other members
        # (a worker's own children) may still run. A session id stays taken
        # while any member lives, so it names no other process.
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    if grace > 0 and any(p.poll() is None for p in procs):
        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    signal_all(signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in the kernel; nothing more to do from here
            pass


def describe_status(code: int) -> str:
    """'exited with code 3', 'was killed by SIGKILL' for a ``Popen.returncode``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def poll_until(ready: Callable[[], bool], timeout: float, what: str, *,
               state: Optional[Callable[[], str]] = None, check: Optional[Callable[[], None]] = None,
               interval: float = 0.01) -> None:
    """Wait until ``ready()`` is true, polling every ``interval`` s, at most ``timeout`` s.

    ``check()``, called between polls, may raise to stop the wait early (a process
    died). After the deadline ``ready()`` is asked once more, then
    :class:`fastps.TimeoutError` says ``what`` did not happen, with ``state()`` (what
    was seen instead) when given. For tests and launchers: a wait on real state in
    place of a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() >= deadline  # decided before looking: the last look is after it
        if ready():
            return
        if check is not None:
            check()
        if expired:
            seen = f" (seen: {state()})" if state is not None else ""
            raise FastPSTimeoutError(f"timed out after {timeout:g} s waiting for {what}{seen}")
        time.sleep(interval)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached the launcher (``signum``); the job was stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interrupt_on_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, each of ``signums`` raises :class:`Interrupted` (a KeyboardInterrupt),
    so that SIGTERM leaves through the same cleanup as Ctrl-C. Main thread only."""
    def raise_interrupted(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class ProcessResult:
    """How one process of a job ended, and what it wrote to the files it had (else '')."""

    name: str
    args: List[str]
    returncode: int
    stdout: str
    stderr: str


class JobFailed(FastPSError):
    """A process of a :class:`LocalJob` failed, or the job outlived its deadline.

    Attributes: ``name`` (the process's, e.g. ``'worker 1'``; for a deadline the
    first one still running), ``rank`` (its rank; None for a process that is not a
    rank), ``returncode`` (None at a deadline), ``log`` (the file holding its error
    output; None when it went to the terminal) and ``tail`` (the last lines of that
    file).
    """

    def __init__(self, message: str, name: str, returncode: Optional[int], log: Optional[Path], tail: str,
                 rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.name, self.returncode, self.log, self.tail, self.rank = name, returncode, log, tail, rank


class JobTimedOut(JobFailed):
    """The job, or a wait for its state, outlived its deadline."""


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the launcher dies (Linux), so no orphan keeps running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the launcher's own cleanup still applies
        pass


def _read(path: Optional[Path]) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class _Proc:
    def __init__(self, name: str, rank: Optional[int], popen: subprocess.Popen, out: Optional[Path],
                 err: Optional[Path]) -> None:
        self.name, self.rank, self.popen, self.out, self.err = name, rank, popen, out, err

    @property
    def log(self) -> Optional[Path]:
        """The file with its error output: its stderr file, else its merged one."""
        return self.err or self.out

    def tail(self, lines: int) -> str:
        if self.log is None:
            return ""
        text = _read(self.log).splitlines()
        return "\n".join(text[-lines:])

    def result(self) -> ProcessResult:
        return ProcessResult(self.name, list(self.popen.args), self.popen.returncode,
                             _read(self.out), _read(self.err))


class LocalJob:
    """The processes of one job on this host: ranks with torchrun's environment, and others.

    The job hosts its rendezvous store itself (Note [Local job's rendezvous port]);
    every process runs in a session of its own; leaving the ``with`` block (or
    :meth:`stop`) stops every process still running, with its children.

    Args:
        world_size: the number of ranks (``WORLD_SIZE``).
        env: variables added to this process's environment for every process.
        log_dir: where output files go (default: a temporary directory, removed by close).
        grace: seconds between SIGTERM and SIGKILL when stopping (0: SIGKILL at once).
        die_with_launcher: children get SIGTERM when the launcher dies (Linux).
        host_store: the launcher hosts the rendezvous store (default); False: rank 0 hosts
            it, on a port free when the job was made (the mode of a job launched by hand,
            for tests of it; the port can be taken before rank 0 binds it).

    Example::

        with LocalJob(2, env={"FASTPS_TIMEOUT": "60"}) as job:
            for r in range(2):
                job.start(f"worker {r}", [sys.executable, "train.py"], rank=r)
            results = job.wait(600)  # raises JobFailed naming the first failure
    """

    def __init__(self, world_size: int, *, env: Optional[Mapping[str, str]] = None,
                 log_dir: Optional[Path] = None, grace: float = 0.0, die_with_launcher: bool = False,
                 host_store: bool = True) -> None:
        import torch.distributed as dist

        self.grace = grace
        self._die_with_launcher = die_with_launcher
        self._procs: List[_Proc] = []
        self._files = []
        self._tmp = None if log_dir is not None else tempfile.TemporaryDirectory(prefix="fastps-job-")
        self.log_dir = Path(log_dir) if log_dir is not None else Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._store = None
        if host_store:  # See Note [Local job's rendezvous port].
            self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=30))
        self.env = job_env(world_size, port=self._store.port if host_store else None)
        self.port = int(self.env["MASTER_PORT"])
        if host_store:
            self.env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        self.env.update(env or {})

    def start(self, name: str, cmd: Sequence[str], *, rank: Optional[int] = None,
              env: Optional[Mapping[str, str]] = None, stdout: Optional[str] = INHERIT,
              stderr: Optional[str] = INHERIT) -> subprocess.Popen:
        """Start process ``name`` running ``cmd``; with ``rank``, as that rank of the job.

        ``stdout`` and ``stderr`` are file names under ``log_dir``, or :data:`INHERIT`
        (this process's own); ``stderr`` may also be :data:`STDOUT` (the stdout file).
        ``env`` adds to the job's environment.
        """
        full = dict(self.env, **(env or {}))
        if rank is not None:
            full = rank_env(full, rank)
        out = self.log_dir / stdout if stdout is not INHERIT else None
        err = self.log_dir / stderr if stderr not in (INHERIT, STDOUT) else None
        fout = self._open(out)
        ferr = subprocess.STDOUT if stderr == STDOUT and fout is not None else self._open(err)
        popen = subprocess.Popen(list(cmd), env=full, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL,
                                 start_new_session=True,
                                 preexec_fn=_set_pdeathsig if self._die_with_launcher else None)
        self._procs.append(_Proc(name, rank, popen, out, err))
        return popen

    def _open(self, path: Optional[Path]):
        if path is None:
            return None
        f = open(path, "w")
        self._files.append(f)
        return f

    @property
    def processes(self) -> List[subprocess.Popen]:
        """Every process started, in order."""
        return [p.popen for p in self._procs]

    def _failure(self, tail_lines: int) -> Optional[JobFailed]:
        for p in self._procs:
            code = p.popen.poll()
            if code not in (None, 0):
                return JobFailed(f"{p.name} {describe_status(code)}", p.name, code, p.log, p.tail(tail_lines), p.rank)
        return None

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str, *, tail_lines: int = 40) -> None:
        """Poll ``ready()`` until it is true; raise :class:`JobFailed` as soon as a process
        exits before (any status: the job is not meant to end yet), :class:`JobTimedOut`
        naming ``what`` after ``timeout`` seconds (:func:`poll_until`)."""
        def no_exit() -> None:
            for p in self._procs:
                code = p.popen.poll()
                if code is not None:
                    tail = p.tail(tail_lines)
                    raise JobFailed(f"{p.name} {describe_status(code)} before {what}"
                                    + (f"; the end of its output:\n{tail}" if tail else ""),
                                    p.name, code, p.log, tail, p.rank)

        try:
            poll_until(ready, timeout, what, check=no_exit, interval=0.05)
        except FastPSTimeoutError as e:
            raise JobTimedOut(str(e), "", None, None, "") from None

    def wait(self, timeout: float, *, until: Optional[Sequence[subprocess.Popen]] = None,
             fail_fast: bool = True, linger: float = 0.0, tail_lines: int = 40) -> List[ProcessResult]:
        """Wait for the processes in ``until`` (default: all) to exit; return every process's result.

        With ``fail_fast`` the first process that exits non-zero (or by a signal) stops
        all the others and raises :class:`JobFailed` naming it; without, the results say
        how each ended. Once those of ``until`` finished, the others get ``linger``
        seconds to exit by themselves (dedicated servers leave after the workers), then
        are stopped. :class:`JobTimedOut` after ``timeout`` seconds (every process is
        stopped first).
        """
        procs = [p for p in self._procs if until is None or p.popen in until]
        deadline = time.monotonic() + timeout
        while True:
            failed = self._failure(tail_lines) if fail_fast else None
            if failed is not None:
                self.stop()
                raise failed
            if all(p.popen.poll() is not None for p in procs):
                break
            if time.monotonic() > deadline:
                late = next((p for p in procs if p.popen.poll() is None), procs[0])
                self.stop()
                raise JobTimedOut(f"the job did not finish within {timeout:.0f} s", late.name, None, late.log,
                                  late.tail(tail_lines), late.rank)
            time.sleep(0.05)
        end = time.monotonic() + linger
        while time.monotonic() < end and any(p.popen.poll() is None for p in self._procs):
            time.sleep(0.05)
        self.stop()
        return [p.result() for p in self._procs]

    def _find(self, popen: subprocess.Popen) -> _Proc:
        return next(p for p in self._procs if p.popen is popen)

    def result(self, popen: subprocess.Popen) -> ProcessResult:
        """The result of one process, which must have exited (its output files as they are)."""
        return self._find(popen).result()

    def tail(self, popen: subprocess.Popen, lines: int) -> str:
        """The last ``lines`` lines of one process's error output ('' when it went to the terminal)."""
        return self._find(popen).tail(lines)

    def stop(self) -> None:
        """Stop every process still running, with its session (see ``grace``); idempotent."""
        stop_sessions(self.processes, grace=self.grace)

    def close(self) -> None:
        """Stop every process, close the output files and the store, remove a temporary log_dir."""
        try:
            self.stop()
        finally:
            for f in self._files:
                f.close()
            self._files = []
            self._store = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> "LocalJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JobHandle:
    """Base of a caller's own job object that owns a :class:`LocalJob` as ``self.job``:
    a context manager that stops every process of the job when it leaves (``kill``)."""

    job: LocalJob

    def kill(self) -> None:
        """Stop every process still running, with its children (``LocalJob.close``)."""
        self.job.close()

    def __enter__(self) -> "JobHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
