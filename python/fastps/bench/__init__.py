"""The benchmark suite: ``fastps bench allreduce|sparse|optim`` (also ``python -m fastps.bench``).

    fastps bench allreduce [options]   push_pull vs torch.distributed.all_reduce (gloo; nccl on GPUs),
                                       nccl-tests columns over a sweep of sizes
    fastps bench sparse [options]      sparse embedding step: fastps.nn vs torch vs a vectorised floor
    fastps bench optim [options]       one Adam step: fastps.optim vs torch.optim (default, foreach, fused)

Every benchmark takes ``--json PATH`` and ``--plot PATH``; see docs/benchmarks.md.
The scripts under bench/ in the source tree are wrappers of these commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line description)
COMMANDS = {
    "allreduce": ("allreduce", "push_pull vs torch.distributed.all_reduce over a sweep of sizes"),
    "sparse": ("sparse", "sparse embedding training step: fastps.nn vs torch vs a floor"),
    "optim": ("optim", "one Adam step: fastps.optim vs torch.optim"),
}


def main(argv: Optional[List[str]] = None, prog: str = "fastps bench") -> int:
    """Run the benchmark named by ``argv[0]`` with the rest of ``argv``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=list(COMMANDS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its options (see: %(prog)s BENCHMARK -h)")
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    module = importlib.import_module(f".{COMMANDS[args.benchmark][0]}", __name__)
    return module.main(args.args, prog=f"{prog} {args.benchmark}")
