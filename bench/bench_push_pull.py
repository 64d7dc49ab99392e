"""Kept so the commands recorded in bench/README.md keep working: `fastps bench allreduce` (fastps.bench.allreduce)."""

import sys

from fastps.bench.allreduce import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/bench_push_pull.py"))
