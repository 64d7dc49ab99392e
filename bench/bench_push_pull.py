"""Dense push_pull (sum over workers) against torch.distributed.all_reduce (gloo), in one run.

Two workers on this machine. For every message size, both systems sum a
float32 tensor over the workers; rank 0 prints nccl-tests style columns for
each system: time (median microseconds per operation), algbw (size / time,
GB/s), busbw (algbw * 2(n-1)/n) and #wrong (elements, summed over the ranks,
that differ from the exact expected sum; inputs are small integers, so the
sum is exact), and the ratio of fastps's algbw to gloo's. A separate line
reports the median round trip of a 1 KiB operation.

The script starts its own workers, or runs as one under torchrun:

    python bench/bench_push_pull.py                        # 4 KiB .. 256 MiB, x2
    python bench/bench_push_pull.py -b 1M -e 64M -f 4 -n 10 --json out.json
    torchrun --nproc-per-node 2 bench/bench_push_pull.py

fastps settings come from the environment (FASTPS_CONNECTIONS,
FASTPS_CHUNK_BYTES, FASTPS_NUM_SHARDS, ...; see docs/configuration.md).
Iterations shrink for large sizes (at most --max-bytes per size and system)
so that the default run takes a couple of minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import List, Optional

import torch

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '256M', '1G', '1024' (binary suffixes, as in nccl-tests)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SUFFIX and t[-1:] != "" else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4K, 256M, 1G)") from None
    n = int(value * _SUFFIX[unit])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return n


def format_size(n: int) -> str:
    for unit, f in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def sizes(begin: int, end: int, factor: int) -> List[int]:
    out, s = [], begin
    while s <= end:
        out.append(s)
        s *= factor
    return out


def iterations(size: int, iters: int, warmup: int, max_bytes: int) -> tuple:
    """Fewer iterations for large sizes: about max_bytes per size and system, at least 3."""
    n = max(3, min(iters, max_bytes // size))
    w = max(1, min(warmup, max(1, n // 3)))
    return n, w


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("4K"), help="smallest size (4K)")
    ap.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("256M"), help="largest size (256M)")
    ap.add_argument("-f", "--stepfactor", type=int, default=2, help="multiplication factor between sizes (2)")
    ap.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size (20, fewer when large)")
    ap.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed iterations first (5)")
    ap.add_argument("--max-bytes", type=parse_size, default=parse_size("2G"),
                    help="cap on bytes timed per size and system; lowers -n for large sizes (2G)")
    ap.add_argument("--latency-iters", type=int, default=2000, help="1 KiB round trips timed (2000, 0: skip)")
    ap.add_argument("--blocks", type=int, default=4,
                    help="the systems take turns in this many blocks of iterations per size (4)")
    ap.add_argument("--systems", default="fastps,gloo", help="comma-separated: fastps,gloo")
    ap.add_argument("--json", metavar="PATH", help="write one record per system and size")
    ap.add_argument("--nproc", type=int, default=2, help="workers to start when not under torchrun (2)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds before the launcher kills the workers (900)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (1)")
    args = ap.parse_args(argv)
    if args.stepfactor < 2:
        ap.error("-f must be at least 2")
    if args.minbytes > args.maxbytes:
        ap.error("-b must not exceed -e")
    if args.minbytes % 4 or args.maxbytes % 4:
        ap.error("sizes must be multiples of 4 bytes (float32)")
    if args.iters < 1 or args.warmup_iters < 0:
        ap.error("-n must be >= 1 and -w >= 0")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = set(args.systems) - {"fastps", "gloo"}
    if bad or not args.systems:
        ap.error(f"--systems takes fastps and/or gloo, got {sorted(bad)}")
    return args


# --- Launcher -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: List[str]) -> int:
    """Start args.nproc workers (this script) and wait; kill all if one fails or time runs out."""
    port = free_port()
    procs: List[subprocess.Popen] = []
    env0 = dict(os.environ)
    env0.setdefault("FASTPS_TIMEOUT", "120")  # no wait in a worker outlives a dead peer for long
    for rank in range(args.nproc):
        env = dict(env0, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc),
                   LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env,
                                      start_new_session=True))

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()

    def on_signal(signum, _frame):
        kill_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r, c = failed[0]
                print(f"bench_push_pull: worker rank {r} exited with {c}; stopping the others", file=sys.stderr)
                kill_all()
                return 1
            if all(c == 0 for c in codes):
                return 0
            if time.monotonic() > deadline:
                print(f"bench_push_pull: workers still running after {args.timeout:.0f}s; killing them",
                      file=sys.stderr)
                kill_all()
                return 1
            time.sleep(0.1)
    finally:
        kill_all()


# --- Worker -------------------------------------------------------------------


def fill(numel: int, rank: int) -> torch.Tensor:
    """Small integers: every partial sum is exact in float32."""
    return (torch.arange(numel, dtype=torch.int64) % 251 + 1 + 1000 * rank).to(torch.float32)


def expected_sum(numel: int, world: int) -> torch.Tensor:
    return sum(fill(numel, r) for r in range(world))


def count_wrong(out: torch.Tensor, expected: torch.Tensor) -> int:
    if torch.equal(out, expected):
        return 0
    return int((out != expected).sum())


class System:
    """One way of summing a tensor over the workers, timed op by op."""

    name = ""

    def prepare(self, numel: int) -> None: ...

    def before(self) -> None:
        """Untimed work before each operation (refill an in-place buffer)."""

    def op(self) -> None: ...

    def result(self) -> torch.Tensor: ...

    def release(self) -> None: ...


class FastpsSystem(System):
    name = "fastps"

    def __init__(self, client, rank: int) -> None:
        self.client, self.rank = client, rank

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, self.rank)
        self.out = torch.empty(numel)
        self.key = self.client.register(self.inp, aggregate=True)

    def op(self) -> None:
        self.client.push_pull(self.key, self.inp, self.out).wait()

    def result(self) -> torch.Tensor:
        return self.out

    def release(self) -> None:
        self.inp = self.out = None  # the servers keep the key: fastps has no unregister


class GlooSystem(System):
    name = "gloo"

    def __init__(self, rank: int) -> None:
        import torch.distributed as dist

        self.dist, self.rank = dist, rank

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, self.rank)
        self.buf = torch.empty(numel)

    def before(self) -> None:
        self.buf.copy_(self.inp)  # all_reduce is in place

    def op(self) -> None:
        self.dist.all_reduce(self.buf)

    def result(self) -> torch.Tensor:
        return self.buf

    def release(self) -> None:
        self.inp = self.buf = None


def run_ops(system: System, n: int, expected: torch.Tensor, times: Optional[list]) -> int:
    """n checked operations; appends each one's microseconds to `times` (None: warmup)."""
    wrong = 0
    for _ in range(n):
        system.before()
        t0 = time.perf_counter()
        system.op()
        t1 = time.perf_counter()
        wrong += count_wrong(system.result(), expected)
        if times is not None:
            times.append((t1 - t0) * 1e6)
    return wrong


def time_systems(systems: List[System], numel: int, iters: int, warmup: int, expected: torch.Tensor,
                 blocks: int) -> List[tuple]:
    """(median us per op, elements wrong on this rank) per system; every op is checked.

    The systems take turns in `blocks` blocks of iters/blocks operations, so a
    burst of load from elsewhere on the machine hits all of them alike.
    """
    for s in systems:
        s.prepare(numel)
    times = [[] for _ in systems]
    wrong = [0 for _ in systems]
    per_block = -(-iters // max(1, min(blocks, iters)))
    done = 0
    first = True
    while done < iters:
        n = min(per_block, iters - done)
        for i, s in enumerate(systems):
            if first:
                wrong[i] += run_ops(s, warmup, expected, None)
            wrong[i] += run_ops(s, n, expected, times[i])
        first = False
        done += n
    for s in systems:
        s.release()
    return [(statistics.median(t), w) for t, w in zip(times, wrong)]


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    import fastps

    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    timeout = float(os.environ.get("FASTPS_TIMEOUT", "120"))
    # fastps first: on rank 0 (outside torchrun) it hosts the multi-tenant
    # TCPStore that gloo's env:// rendezvous then shares.
    client = fastps.Client()
    dist.init_process_group(backend="gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    systems = {"fastps": FastpsSystem(client, rank), "gloo": GlooSystem(rank)}
    names = args.systems

    def total(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    out = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    chunk = int(os.environ.get("FASTPS_CHUNK_BYTES", 4 << 20))
    out(f"# push_pull vs all_reduce(gloo): {world} workers, torch {torch.__version__} "
        f"({args.threads} thread/worker), fastps {fastps.__version__}, {os.cpu_count()} CPUs")
    out(f"# fastps: FASTPS_CONNECTIONS={os.environ.get('FASTPS_CONNECTIONS', '1')} "
        f"FASTPS_CHUNK_BYTES={chunk} FASTPS_NUM_SHARDS={os.environ.get('FASTPS_NUM_SHARDS', 'auto')}")
    out("# time: median us per op; algbw = size / time (GB/s, 1e9); busbw = algbw * 2(n-1)/n; "
        "#wrong: elements != exact sum")

    factor = 2 * (world - 1) / world
    records = []
    lat = {}
    if args.latency_iters > 0:
        numel = 1024 // 4
        exp = expected_sum(numel, world)
        res = time_systems([systems[n] for n in names], numel, args.latency_iters,
                           max(10, args.latency_iters // 10), exp, args.blocks)
        for name, (t, w) in zip(names, res):
            lat[name] = (total(t) / world, int(total(w)))
        out("# 1 KiB round trip (median us): " +
            "  ".join(f"{n} {lat[n][0]:.1f}" + (f" ({lat[n][1]} wrong)" if lat[n][1] else "") for n in names))

    head1 = f"{'':>12} {'':>10}" + "".join(f" |{n:^35}" for n in names) + (" |" if len(names) == 2 else "")
    head2 = f"{'size':>12} {'count':>10}" + "".join(
        f" | {'time':>8} {'algbw':>7} {'busbw':>7} {'#wrong':>8}" for _ in names)
    head3 = f"{'(B)':>12} {'(elements)':>10}" + "".join(
        f" | {'(us)':>8} {'(GB/s)':>7} {'(GB/s)':>7} {'':>8}" for _ in names)
    if len(names) == 2:
        head2 += f" | {'ratio':>6}"
        head3 += f" | {'algbw':>6}"
    out(head1)
    out(head2)
    out(head3)
    for size in sizes(args.minbytes, args.maxbytes, args.stepfactor):
        numel = size // 4
        iters, warmup = iterations(size, args.iters, args.warmup_iters, args.max_bytes)
        exp = expected_sum(numel, world)
        row = f"{size:>12} {numel:>10}"
        algbws = {}
        res = time_systems([systems[n] for n in names], numel, iters, warmup, exp, args.blocks)
        for name, (t, w) in zip(names, res):
            t = total(t) / world  # mean of the ranks' medians
            w = int(total(w))
            algbw = size / t / 1e3
            algbws[name] = algbw
            row += f" | {t:>8.1f} {algbw:>7.3f} {algbw * factor:>7.3f} {w:>8d}"
            records.append({"system": name, "size": size, "count": numel, "time_us": t, "algbw": algbw,
                            "busbw": algbw * factor, "wrong": w, "iters": iters})
        if len(names) == 2:
            row += f" | {algbws[names[0]] / algbws[names[1]]:>5.2f}x"
        out(row)
        del exp

    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"latency_1k_us": {n: lat[n][0] for n in lat}, "records": records}, f, indent=1)
    bad = sum(r["wrong"] for r in records) + sum(v[1] for v in lat.values())
    out(f"# {'all results exact' if bad == 0 else f'{bad} wrong elements in total'}")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return worker(args)
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
