"""One worker, one parameter server in another process: the time of a single push and of a
single pull per transport, side by side in one run (the first transport is the baseline of
the ratios). No colocated server, no second worker: what one request costs on the wire.

    python bench/transport_push_pull.py                          # tcp,ucx at 1 MiB and 16 MiB
    python bench/transport_push_pull.py --transport tcp,shm,ucx -s 64K,1M,16M -n 40
    UCX_TLS=tcp,self UCX_NET_DEVICES=lo python bench/transport_push_pull.py   # UCX on loopback

The server applies SGD with lr 0 (it reads and writes every pushed element); pulls read
round 0. Each row is the median of -n timed requests after 5 warm-up ones; chunks of
--chunk bytes (FASTPS_CHUNK_BYTES' default) travel as separate frames.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from fastps import _C
from fastps.bench._common import parse_size


def _sgd():
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.SGD
    h.lr = 0.0
    return h


def _serve(transport: str) -> None:
    server = _C.PsServer(0, 1, secret="bench", transport=transport)
    print(server.port, flush=True)
    sys.stdin.read()  # until the client closes our stdin


def _measure(transport: str, sizes, iters: int, chunk: int):
    server = subprocess.Popen([sys.executable, __file__, "--serve", transport], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        client = _C.PsClient(0, secret="bench", timeout_s=60, chunk_bytes=chunk, transport=transport)
        client.connect([("127.0.0.1", port)])
        out = {}
        for tid, size in enumerate(sizes, start=1):
            n = size // 4
            p, g, dst = torch.zeros(n), torch.ones(n), torch.empty(n)
            client.register_dense(tid, n, False, _sgd(), p.data_ptr(), n).wait()
            ops = {"push": lambda: client.push(tid, g.data_ptr(), n, _sgd(), 1).wait(),
                   "pull": lambda: client.pull(tid, dst.data_ptr(), n, 0).wait()}
            for op, run in ops.items():
                for _ in range(5):
                    run()
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                out[(size, op)] = statistics.median(times)
            if not torch.equal(dst, p):  # lr 0: the pulls must return the registered values
                raise SystemExit(f"{transport}: a pull of {size} bytes returned wrong values")
        del client
        return out
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        server.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="tcp,ucx", help="comma-separated; the first is the baseline")
    ap.add_argument("-s", "--sizes", default="1M,16M", help="comma-separated payload sizes (bytes, K, M)")
    ap.add_argument("-n", "--iters", type=int, default=30)
    ap.add_argument("--chunk", default="4M", help="bytes per frame (FASTPS_CHUNK_BYTES)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve)
        return 0
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    results = {t: _measure(t, sizes, args.iters, parse_size(args.chunk)) for t in transports}
    base = transports[0]
    print(f"# one request, median of {args.iters} (us); GB/s = size / time; ratio = {base} time / this time")
    print(f"{'size':>10} {'op':>5} | " + " | ".join(f"{t:>24}" for t in transports))
    for size in sizes:
        for op in ("push", "pull"):
            cells = []
            for t in transports:
                s = results[t][(size, op)]
                ratio = results[base][(size, op)] / s
                cells.append(f"{s * 1e6:9.1f} {size / s / 1e9:6.2f} {ratio:5.2f}x")
            print(f"{size:>10} {op:>5} | " + " | ".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
