"""``python -m fastps.bench allreduce|sparse|optim``: the same command line as ``fastps bench``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m fastps.bench"))
