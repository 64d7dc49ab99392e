"""The ``fastps`` command line (also ``python -m fastps``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastps`` console script."""
    from . import __version__, _C

    parser = argparse.ArgumentParser(prog="fastps", description="fastps parameter server tools")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print the build and CPU kernel information")
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command == "info":
        print(f"fastps {__version__}")
        print(f"optimizer kernels: {_C.optim_kernel_isa()}")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
