"""What the launchers of one-host jobs share: the ranks' environment and stopping them.

``fastps demo``, ``fastps bench allreduce`` and the multi-process tests start
worker (and server) processes themselves instead of through torchrun. They
give every rank the environment torchrun would (:func:`job_env`,
:func:`rank_env`), start each process in a session of its own, and stop whole
sessions when they leave (:func:`stop_sessions`), so no child or grandchild
outlives its launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Dict, Mapping, Optional, Sequence

from ._cluster import free_port


def job_env(world_size: int, base: Optional[Mapping[str, str]] = None, *,
            port: Optional[int] = None) -> Dict[str, str]:
    """The environment shared by every rank of a one-host job of ``world_size`` workers.

    ``base`` (default: this process's environment) plus ``MASTER_ADDR=127.0.0.1``,
    ``MASTER_PORT`` (``port``, or one free now), ``WORLD_SIZE`` and
    ``LOCAL_WORLD_SIZE``. ``TORCHELASTIC_*`` variables are dropped: the job is not
    run by a torchrun agent, so its rank 0 hosts the rendezvous store itself
    (fastps/_cluster.py).
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
