"""The ``fastps`` command line (also ``python -m fastps``).

    fastps info                     build and CPU kernel information
    fastps server [options]         a dedicated parameter server for a torchrun job
    fastps demo [options]           train a small GPT data-parallel through fastps (docs/demo.md)
    fastps bench allreduce|sparse|optim [options]
                                    the benchmark suite: push_pull vs all_reduce, sparse embedding
                                    step, Adam step, with JSON and plots (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


def _server(args: argparse.Namespace) -> int:
    from . import _C, _cluster, _config

    addr = args.master_addr or _config.resolve("MASTER_ADDR")
    port = args.master_port or _config.resolve("MASTER_PORT")
    workers = args.workers or (_config.resolve("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 0)
    if not addr or not port or workers < 1:
        print("fastps server: need --master-addr, --master-port and --workers (or MASTER_ADDR, "
              "MASTER_PORT, WORLD_SIZE): the job's rendezvous store and its number of workers",
              file=sys.stderr)
        return 2
    # The flags are the keyword arguments; the rest comes from FASTPS_* or the defaults.
    cfg = _cluster.ClusterConfig(rank=0, world_size=workers, master_addr=addr, master_port=port,
                                 **_config.resolve_all(overrides=dict(
                                     staleness=args.staleness, bind=args.bind, advertise=args.advertise,
                                     timeout=args.timeout, num_shards=args.shards)))
    _config.apply_process_settings(cfg)
    store, _raw = _cluster.open_store(cfg, host_store=False)
    secret = cfg.secret or _cluster.store_get(
        store, "secret", cfg.timeout, "rank 0 to publish the job secret", where=f"{addr}:{port}").decode()
    sid = workers + int(store.add("dedicated_servers", 1)) - 1
    server = _C.PsServer(sid, workers, num_shards=cfg.num_shards, staleness=cfg.staleness,
                         host=cfg.bind, port=args.port, secret=secret, timeout_s=cfg.timeout,
                         **_config.transport_kwargs(cfg), liveness_timeout_s=cfg.liveness_timeout,
                         send_queue_bytes=cfg.send_queue_bytes)
    store.set(f"server/{sid}", f"{_cluster.advertised_host(cfg)}:{server.port}")
    print(f"fastps server {sid} listening on {cfg.bind}:{server.port} for {workers} workers", flush=True)
    # Serve until every worker has left the job, one failed (or the process is killed).
    while True:
        try:
            if store.check(["barrier/shutdown/done"]):
                break
            if store.check([_cluster.FAILED_KEY]):
                print(f"fastps server {sid}: leaving: {store.get(_cluster.FAILED_KEY).decode(errors='replace')}",
                      file=sys.stderr, flush=True)
                break
        except Exception:  # noqa: BLE001 - the store went away with the job
            break
        time.sleep(0.5)
    del server
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastps`` console script."""
    from . import __version__, _C

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: options come after the benchmark's name
        from .bench import main as _bench

        return _bench(argv[1:], prog="fastps bench")
    parser = argparse.ArgumentParser(prog="fastps", description="fastps parameter server tools")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print the build and CPU kernel information")
    sp = sub.add_parser("server", help="run a dedicated parameter server for a torchrun job")
    sp.add_argument("--master-addr", help="rendezvous store host (default: $MASTER_ADDR)")
    sp.add_argument("--master-port", type=int, help="rendezvous store port (default: $MASTER_PORT)")
    sp.add_argument("--workers", type=int, help="number of workers in the job (default: $WORLD_SIZE)")
    sp.add_argument("--bind", help="address to listen on (default: $FASTPS_BIND or 127.0.0.1; 0.0.0.0 for all "
                                   "interfaces)")
    sp.add_argument("--advertise", help="address workers use to reach this server (default: $FASTPS_ADVERTISE, "
                                        "else --bind, or the hostname)")
    sp.add_argument("--port", type=int, default=0, help="port (default: ephemeral)")
    sp.add_argument("--staleness", type=int,
                    help="0 BSP, k SSP, -1 ASP (default: $FASTPS_STALENESS or 0); must match the workers")
    sp.add_argument("--shards", type=int,
                    help="shard threads (default: $FASTPS_NUM_SHARDS, else one per core, at most 8)")
    sp.add_argument("--timeout", type=float,
                    help="seconds to wait for the job to start (default: $FASTPS_TIMEOUT or 300)")
    dp = sub.add_parser("demo", help="train a small GPT on the stdlib's source through fastps (local job)",
                        description="Train a byte-level GPT on Python's standard library source, "
                                    "data-parallel through fastps, with progress, TensorBoard logs, "
                                    "checkpoints, a loss plot and a summary; see docs/demo.md.")
    from .demo.launch import add_arguments as _demo_arguments

    _demo_arguments(dp)
    # Listed for `fastps -h`; `fastps bench ...` is dispatched above, before this parser.
    sub.add_parser("bench", help="the benchmark suite: allreduce, sparse, optim (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command == "info":
        print(f"fastps {__version__}")
        print(f"optimizer kernels: {_C.optim_kernel_isa()}")
        return 0
    if args.command == "server":
        return _server(args)
    if args.command == "demo":
        from .demo.launch import run as _demo

        return _demo(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
