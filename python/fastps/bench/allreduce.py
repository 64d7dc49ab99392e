"""``fastps bench allreduce``: dense push_pull (sum over workers) against torch.distributed.all_reduce.

Workers on this machine (``-np``, default 2). For every message size, each
system sums a float32 tensor over the workers; rank 0 prints nccl-tests style
columns for each system: time (median microseconds per operation), algbw
(size / time, GB/s), busbw (algbw * 2(n-1)/n) and #wrong (elements, summed
over the ranks, that differ from the exact expected sum; inputs are small
integers, so the sum is exact), and the ratio of fastps's algbw to the other
system's. A line before the table reports the median round trip of a 1 KiB
operation.

Systems: ``fastps`` (``fastps.Client.push_pull`` on CPU tensors), ``gloo``
(``all_reduce`` of CPU tensors), only where CUDA and at least 2 GPUs are
present ``nccl`` (``all_reduce`` of CUDA tensors, one GPU per worker), and
``memcpy`` (each worker copies its tensor once: the machine's copy bandwidth,
the yardstick for fastps; not a sum), and, on request (``--systems``),
``tcp-raw`` (2 workers exchange their tensors over one plain loopback socket:
what TCP itself moves; not a sum).

The command starts its own workers, or runs as one under torchrun:

    fastps bench allreduce                                 # 4 KiB .. 256 MiB, x2
    fastps bench allreduce -b 1M -e 64M -f 4 -n 10 --json out.json --plot out.png
    torchrun --nproc-per-node 2 -m fastps.bench allreduce

fastps settings come from the environment (FASTPS_CONNECTIONS,
FASTPS_CHUNK_BYTES, FASTPS_NUM_SHARDS, ...; see docs/configuration.md);
--transport sets FASTPS_TRANSPORT; a list (``--transport tcp,shm,ucx``) runs the
whole benchmark once per transport, one after the other, each with its
baselines. Iterations shrink for large sizes (at most
--max-bytes per size and system) so that the default run takes a minute or two.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from .. import _config
from ..errors import InvalidArgumentError
from ._common import (format_size, launch_workers, new_parser, parse_size, positive_int, pyplot,
                      size_sweep, transport_in_use, write_json)

SYSTEMS = ("fastps", "gloo", "nccl", "memcpy", "tcp-raw")


def nccl_usable(nproc: int) -> bool:
    """True where the nccl baseline can run: CUDA, NCCL, and a GPU for each of `nproc` workers (at least 2)."""
    import torch.distributed as dist

    return (torch.cuda.is_available() and dist.is_nccl_available()
            and torch.cuda.device_count() >= max(2, nproc))


def iterations(size: int, iters: int, warmup: int, max_bytes: int) -> tuple:
    """`iters`, fewer for large sizes: about max_bytes per size and system, but at least 3."""
    n = min(iters, max(3, max_bytes // size))
    w = min(warmup, max(1, n // 3))
    return n, w


def parse_args(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    ap = new_parser(prog or "fastps bench allreduce", __doc__,
                    json_help="write one record per system and size",
                    plot_help="write a PNG of algbw against size, one line per system")
    sweep = ap.add_argument_group("sweep (as in nccl-tests; sizes in bytes, with K, M or G: 4096, 4K, 256M, 1G)")
    sweep.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("4K"), metavar="SIZE",
                       help="smallest size (4K)")
    sweep.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("256M"), metavar="SIZE",
                       help="largest size (256M)")
    sweep.add_argument("-f", "--stepfactor", type=int, default=2, metavar="N",
                       help="multiplication factor between sizes (2)")
    sweep.add_argument("-n", "--iters", type=positive_int, default=20, metavar="N",
                       help="timed iterations per size (20, fewer when large: --max-bytes)")
    sweep.add_argument("-w", "--warmup_iters", type=int, default=5, metavar="N",
                       help="untimed iterations first (5)")
    sweep.add_argument("--max-bytes", type=parse_size, default=parse_size("2G"), metavar="SIZE",
                       help="cap on bytes timed per size and system; lowers -n for large sizes (2G)")
    sweep.add_argument("--latency-iters", type=int, default=2000, metavar="N",
                       help="1 KiB round trips timed (2000, 0: skip)")
    sweep.add_argument("--blocks", type=positive_int, default=4, metavar="N",
                       help="the systems take turns in this many blocks of iterations per size (4)")
    job = ap.add_argument_group("job")
    job.add_argument("--systems", default=None,
                     help="comma-separated, from " + ", ".join(SYSTEMS) + " (default: fastps,gloo,memcpy, "
                          "and nccl where CUDA and 2 GPUs are present)")
    job.add_argument("-np", "--nproc", type=int, default=2, metavar="N",
                     help="workers to start when not under torchrun (2)")
    job.add_argument("--transport", default=None, metavar="|".join(_config.TRANSPORTS),
                     help="fastps's transport, set as FASTPS_TRANSPORT for the workers, or a "
                          "comma-separated list to run once per transport (default: $FASTPS_TRANSPORT, else auto)")
    job.add_argument("--threads", type=positive_int, default=1, metavar="N",
                     help="torch intra-op threads per worker (1)")
    job.add_argument("--timeout", type=float, default=900.0, metavar="S",
                     help="seconds before the launcher kills the workers (900)")
    args = ap.parse_args(argv)
    if args.stepfactor < 2:
        ap.error(f"-f must be at least 2 (the factor between sizes), got {args.stepfactor}")
    if args.minbytes > args.maxbytes:
        ap.error(f"-b ({format_size(args.minbytes)}) must not exceed -e ({format_size(args.maxbytes)})")
    if args.minbytes % 4 or args.maxbytes % 4:
        ap.error("sizes must be multiples of 4 bytes (float32), e.g. -b 4K -e 64M")
    if args.warmup_iters < 0 or args.latency_iters < 0:
        ap.error("-w and --latency-iters must be >= 0")
    if args.timeout <= 0:
        ap.error("--timeout must be > 0")
    if args.nproc < 2 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        ap.error(f"-np must be at least 2 (a sum over one worker measures nothing), got {args.nproc}")
    world = int(os.environ.get("WORLD_SIZE", "0")) or args.nproc
    if args.systems is None:
        args.systems = ["fastps", "gloo"] + (["nccl"] if nccl_usable(world) else []) + ["memcpy"]
    else:
        args.systems = list(dict.fromkeys(s.strip() for s in args.systems.split(",") if s.strip()))
        bad = [s for s in args.systems if s not in SYSTEMS]
        if bad or not args.systems:
            ap.error(f"--systems takes a comma-separated list from {', '.join(SYSTEMS)}, got {args.systems!r}")
        if "nccl" in args.systems and not nccl_usable(world):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            ap.error(f"--systems nccl needs CUDA and one GPU per worker (at least 2); this machine has {n} GPU(s)")
        if "tcp-raw" in args.systems and world != 2:
            ap.error(f"--systems tcp-raw needs exactly 2 workers (-np 2), got {world}")
    try:
        args.transports = ([_config.resolve("transport", t) for t in args.transport.split(",") if t.strip()]
                           if args.transport is not None else [_config.resolve("transport")])
    except InvalidArgumentError as e:
        ap.error(str(e))
    if not args.transports:
        ap.error(f"--transport takes one of {', '.join(_config.TRANSPORTS)} or a comma-separated list of them")
    if len(args.transports) > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("a list of transports runs one job per transport: run it without torchrun")
    args.transport = args.transports[0]
    return args


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

    def wrong(self, expected: torch.Tensor) -> int:
        """Elements of the last result that differ from the exact sum."""
        return count_wrong(self.result(), expected)

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
    """torch.distributed.all_reduce of CPU tensors in the default (gloo) process group."""

    name = "gloo"
    group = None  # the default process group

    def __init__(self, rank: int) -> None:
        import torch.distributed as dist

        self.dist, self.rank = dist, rank

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, self.rank)
        self.buf = torch.empty(numel)

    def before(self) -> None:
        self.buf.copy_(self.inp)  # all_reduce is in place

    def op(self) -> None:
        self.dist.all_reduce(self.buf, group=self.group)

    def result(self) -> torch.Tensor:
        return self.buf

    def release(self) -> None:
        self.inp = self.buf = None


class MemcpySystem(System):
    """The machine's copy bandwidth: every worker copies its tensor once (``Tensor.copy_``),
    at the same time, the yardstick of issue 5's "50% of memcpy bandwidth" target. Not a sum:
    its #wrong column checks the copy."""

    name = "memcpy"

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, 0)
        self.out = torch.empty(numel)

    def op(self) -> None:
        self.out.copy_(self.inp)

    def result(self) -> torch.Tensor:
        return self.out

    def wrong(self, expected: torch.Tensor) -> int:
        return count_wrong(self.out, self.inp)

    def release(self) -> None:
        self.inp = self.out = None


class RawTcpSystem(System):
    """Two raw loopback TCP streams (2 workers only): each worker sends its whole tensor to
    the other over one socket while receiving the other's, with no protocol at all: what
    the kernel's loopback moves, the yardstick of "TCP forced: x% of two raw streams".
    Not a sum: its #wrong column checks the received bytes."""

    name = "tcp-raw"

    def __init__(self, rank: int, world: int) -> None:
        import concurrent.futures
        import torch.distributed as dist

        if world != 2:
            raise ValueError("the tcp-raw system needs exactly 2 workers (-np 2)")
        self.rank = rank
        self.pool = concurrent.futures.ThreadPoolExecutor(1)  # the sending side of each op
        addr = [None]
        if rank == 0:
            lsock = socket.create_server(("127.0.0.1", 0))
            addr = [lsock.getsockname()[1]]
        dist.broadcast_object_list(addr, src=0)
        if rank == 0:
            lsock.settimeout(60)
            self.sock, _ = lsock.accept()
            lsock.close()
        else:
            self.sock = socket.create_connection(("127.0.0.1", addr[0]), timeout=60)
        self.sock.settimeout(120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, self.rank)
        self.out = torch.empty(numel)
        self.peer = fill(numel, 1 - self.rank)

    def op(self) -> None:
        sent = self.pool.submit(self.sock.sendall, memoryview(self.inp.numpy()).cast("B"))
        view = memoryview(self.out.numpy()).cast("B")
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("tcp-raw: the other worker closed its socket")
            got += n
        sent.result()

    def result(self) -> torch.Tensor:
        return self.out

    def wrong(self, expected: torch.Tensor) -> int:
        return count_wrong(self.out, self.peer)

    def release(self) -> None:
        self.inp = self.out = self.peer = None


# --- NCCL: only where CUDA and one GPU per worker exist (nccl_usable) ----------
# Untested on the CPU-only reference machine. Each operation is timed until the
# GPU finished it (synchronize), and checked on a copy back to the host.


class NcclSystem(GlooSystem):
    """all_reduce of CUDA tensors (GPU LOCAL_RANK) in an NCCL process group beside the gloo one."""

    name = "nccl"

    def __init__(self, rank: int, local_rank: int) -> None:
        super().__init__(rank)
        self.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(self.device)
        self.group = self.dist.new_group(backend="nccl")  # collective: every rank creates it

    def prepare(self, numel: int) -> None:
        self.inp = fill(numel, self.rank).to(self.device)
        self.buf = torch.empty_like(self.inp)

    def before(self) -> None:
        super().before()
        torch.cuda.synchronize(self.device)

    def op(self) -> None:
        super().op()
        torch.cuda.synchronize(self.device)

    def result(self) -> torch.Tensor:
        return self.buf.cpu()


def run_ops(system: System, n: int, expected: torch.Tensor, times: Optional[list]) -> int:
    """n checked operations; appends each one's microseconds to `times` (None: warmup)."""
    wrong = 0
    for _ in range(n):
        system.before()
        t0 = time.perf_counter()
        system.op()
        t1 = time.perf_counter()
        wrong += system.wrong(expected)
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


def plot_algbw(path: str, records: List[dict], title: str) -> None:
    """algbw (GB/s) against message size, log-x, one line per system; a PNG at `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["system"] for r in records):
        rs = [r for r in records if r["system"] == name]
        ax.plot([r["size"] for r in rs], [r["algbw"] for r in rs], marker="o", label=name)
    sizes = sorted({r["size"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [format_size(x) for x in sizes], rotation=45 if len(sizes) > 8 else 0)
    ax.set_yscale("log")  # small messages and memcpy differ by orders of magnitude
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("algbw (GB/s, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    import fastps

    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    timeout = _config.resolve("timeout")
    names = args.systems
    os.environ["FASTPS_TRANSPORT"] = args.transport  # read when the client connects
    # fastps first: on rank 0 (outside torchrun) it hosts the multi-tenant
    # TCPStore that gloo's env:// rendezvous then shares.
    client = fastps.Client() if "fastps" in names else None
    dist.init_process_group(backend="gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    systems: Dict[str, System] = {}
    for n in names:  # the same order on every rank: NcclSystem creates a group collectively
        if n == "fastps":
            systems[n] = FastpsSystem(client, rank)
        elif n == "gloo":
            systems[n] = GlooSystem(rank)
        elif n == "memcpy":
            systems[n] = MemcpySystem()
        elif n == "tcp-raw":
            systems[n] = RawTcpSystem(rank, world)
        else:
            systems[n] = NcclSystem(rank, int(os.environ.get("LOCAL_RANK", rank)))

    def total(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    out = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    chunk = int(os.environ.get("FASTPS_CHUNK_BYTES", 4 << 20))
    host = socket.gethostname()
    transport = transport_in_use(client) if client is not None else "none (no fastps)"
    baselines = [n for n in names if n != "fastps"]
    out(f"# {' vs '.join(names)}: {world} workers on {host}, torch {torch.__version__} "
        f"({args.threads} thread/worker), fastps {fastps.__version__}, {os.cpu_count()} CPUs")
    out(f"# fastps: transport {transport} (FASTPS_TRANSPORT={args.transport}) "
        f"FASTPS_CONNECTIONS={os.environ.get('FASTPS_CONNECTIONS', '1')} "
        f"FASTPS_CHUNK_BYTES={chunk} FASTPS_NUM_SHARDS={os.environ.get('FASTPS_NUM_SHARDS', 'auto')}")
    out("# time: median us per op; algbw = size / time (GB/s, 1e9); busbw = algbw * 2(n-1)/n; "
        "#wrong: elements != exact sum" + (f"; ratio: {names[0]}'s algbw / the other's" if baselines else ""))

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

    others = names[1:]
    head1 = f"{'':>12} {'':>10}" + "".join(f" |{n:^35}" for n in names) + (" |" if others else "")
    head2 = f"{'size':>12} {'count':>10}" + "".join(
        f" | {'time':>8} {'algbw':>7} {'busbw':>7} {'#wrong':>8}" for _ in names)
    head3 = f"{'(B)':>12} {'(elements)':>10}" + "".join(
        f" | {'(us)':>8} {'(GB/s)':>7} {'(GB/s)':>7} {'':>8}" for _ in names)
    for o in others:
        head2 += f" | {'ratio' if len(others) == 1 else 'vs ' + o:>6}"
        head3 += f" | {'algbw':>6}"
    out(head1)
    out(head2)
    out(head3)
    for size in size_sweep(args.minbytes, args.maxbytes, args.stepfactor):
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
        for o in others:
            row += f" | {algbws[names[0]] / algbws[o]:>5.2f}x"
        out(row)
        del exp

    if rank == 0 and args.json:
        write_json(args.json, {
            "benchmark": "allreduce", "host": host, "transport": transport,
            "fastps_transport": args.transport, "world_size": world, "torch": torch.__version__,
            "fastps": fastps.__version__, "latency_1k_us": {n: lat[n][0] for n in lat}, "records": records})
    if rank == 0 and args.plot:
        plot_algbw(args.plot, records, f"{' vs '.join(names)}: {world} workers on {host}, transport {transport}")
    bad = sum(r["wrong"] for r in records) + sum(v[1] for v in lat.values())
    out(f"# {'all results exact' if bad == 0 else f'{bad} wrong elements in total'}")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of ``fastps bench allreduce``: a worker under torchrun, else the launcher of -np workers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or "fastps bench allreduce"
    args = parse_args(argv, prog)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank = os.environ.get("RANK", "?")
        try:
            return worker(args)
        except Exception as e:  # noqa: BLE001 - one clear line last, for the launcher's tail
            from ..errors import FastPSError

            if not isinstance(e, FastPSError):  # fastps's own errors say what to change
                traceback.print_exc()
            print(f"{prog}: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Leave now: the exit handlers would wait for peers that wait for this rank.
            os._exit(1)
    rc = 0
    for transport in args.transports:  # one job per transport, each with its baselines
        cmd = [sys.executable, "-m", "fastps.bench", "allreduce",
               *_for_transport(argv, transport if len(args.transports) > 1 else None), "--transport", transport]
        rc = launch_workers(prog, cmd, args.nproc, timeout=args.timeout, env={"FASTPS_TRANSPORT": transport}) or rc
    return rc


def _for_transport(argv: List[str], transport: Optional[str]) -> List[str]:
    """`argv` without its --transport option, and with `transport` (if given) in the names of the
    --json and --plot files (out.json -> out.ucx.json), so that each job of a list keeps its own."""
    out: List[str] = []
    it = iter(argv)
    for a in it:
        opt, eq, value = a.partition("=")
        if opt == "--transport":
            if not eq:
                next(it, None)
            continue
        if transport is not None and opt in ("--json", "--plot"):
            value = value if eq else next(it, "")
            stem, dot, ext = value.rpartition(".")
            value = f"{stem}.{transport}.{ext}" if dot and "/" not in ext else f"{value}.{transport}"
            out += [opt, value]
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
