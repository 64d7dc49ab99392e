"""Pieces the benchmarks share: sizes, the worker launcher, JSON and plots.

The launcher starts the workers of a multi-process benchmark with the
environment torchrun would give them, streams their standard output, keeps
their standard error in files, and bounds every wait: when one worker fails
it stops the others and prints the tail of the failed worker's error output;
when the deadline passes it kills them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .. import _local_job

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '256M', '1G', '1024' (binary suffixes, as in nccl-tests; 'KiB', 'MB' also read)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SUFFIX else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (write bytes as a number with an optional K, M or G suffix: "
            "4096, 4K, 256M, 1G)") from None
    n = int(value * _SUFFIX.get(unit, 1))
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r} (examples: 4K, 256M)")
    return n


def format_size(n: int) -> str:
    """4096 -> '4K' (exact multiples only), else the number of bytes."""
    for unit, f in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def size_sweep(begin: int, end: int, factor: int) -> List[int]:
    """begin, begin*factor, ... up to end (nccl-tests' -b/-e/-f)."""
    out, s = [], begin
    while s <= end:
        out.append(s)
        s *= factor
    return out


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def new_parser(prog: str, description: str, *, json_help: str, plot_help: str) -> argparse.ArgumentParser:
    """A benchmark's parser: the module docstring as description, and the --json and --plot outputs."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    out = ap.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help=json_help)
    out.add_argument("--plot", metavar="PATH", help=plot_help)
    return ap


def save_outputs(args: argparse.Namespace, data, plot: Callable[[str, object], None]) -> None:
    """Write `data` to --json and plot(--plot, data), where asked for."""
    if args.json:
        write_json(args.json, data)
    if args.plot:
        plot(args.plot, data)


def write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str, title: str, groups: Mapping[str, Mapping[str, float]], ylabel: str) -> None:
    """Grouped bars: one group per key of `groups`, one bar per (label, value) in it, written as PNG."""
    plt = pyplot()
    labels: List[str] = []
    for bars in groups.values():
        labels += [k for k in bars if k not in labels]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * len(labels) / 2), 4.5))
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i, bars in enumerate(groups.values()) if label in bars]
        ys = [bars[label] for bars in groups.values() if label in bars]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def transport_in_use(client) -> str:
    """How a ``fastps.Client`` reaches the servers that are not in its process: 'tcp', 'shm', 'shm+tcp',
    or 'ucx (UCX 1.13.1: tcp/lo.0)' with the UCX transports in use when its frames travel over UCX."""
    stats = client._client.stats()
    paths = set(client._client.server_paths()) - {"local"}
    if "ucx" in paths:
        paths = (paths - {"ucx"}) | {f"ucx ({stats['ucx']})"}
    return "+".join(sorted(paths)) or "local"


def _report(message: str, tail: str, intro: str) -> None:
    print(message + (f" {intro}\n{tail.rstrip()}" if tail.strip() else ""), file=sys.stderr)


def launch_workers(name: str, cmd: Sequence[str], nproc: int, *, timeout: float,
                   env: Optional[Dict[str, str]] = None, tail_lines: int = 20) -> int:
    """Run `nproc` copies of `cmd` as ranks of one local job; return 0, or 1 if one failed or timed out.

    Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
    (127.0.0.1) and MASTER_PORT (the launcher hosts the store: fastps/_local_job.py),
    plus `env`; FASTPS_TIMEOUT defaults to 120 s so that no wait in a worker outlives
    a dead peer for long. Every worker runs in its own session and is killed (SIGKILL,
    with its children) when this function returns, on Ctrl-C and on SIGTERM (which
    exit with 128 + the signal's number).
    """
    job_env = {"FASTPS_TIMEOUT": os.environ.get("FASTPS_TIMEOUT", "120")}
    job_env.update(env or {})
    try:
        with _local_job.interrupt_on_signals(), _local_job.LocalJob(nproc, env=job_env) as job:
            ranks = [job.start(f"worker rank {r}", list(cmd), rank=r, stderr=f"rank{r}.stderr")
                     for r in range(nproc)]
            try:
                results = job.wait(timeout, tail_lines=tail_lines)
            except _local_job.JobTimedOut:
                _report(f"{name}: workers still running after {timeout:.0f} s (--timeout); killed them.",
                        job.tail(ranks[0], tail_lines), "Rank 0's last error output:")
                return 1
            except _local_job.JobFailed as e:
                _report(f"{name}: worker rank {e.rank} exited with code {e.returncode}; stopped the other workers.",
                        e.tail, f"Rank {e.rank}'s last error output:")
                return 1
            for res in results:  # warnings and the like: shown, as if the workers had printed them
                sys.stderr.write(res.stderr)
            return 0
    except _local_job.Interrupted as e:
        sys.exit(128 + e.signum)
