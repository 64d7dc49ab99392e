"""Kept so the commands recorded in bench/README.md keep working: `fastps bench optim` (fastps.bench.optim)."""

import sys

from fastps.bench.optim import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/bench_optim.py"))
