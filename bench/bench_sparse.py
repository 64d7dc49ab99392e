"""Kept so the commands recorded in bench/README.md keep working: `fastps bench sparse` (fastps.bench.sparse)."""

import sys

from fastps.bench.sparse import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/bench_sparse.py"))
