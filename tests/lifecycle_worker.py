"""Worker program of tests/test_lifecycle.py: a plain training script, no error handling.

    lifecycle_worker.py OUT    trains fastps.optim.SGD until something fails; writes `OUT.ready.RANK`
                               after step 3. An error (a peer killed by the test) is left uncaught, as
                               in a user's script: the process ends through Python's normal exit path
                               (traceback, atexit handlers), which is what the test times.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import fastps

RANK = int(os.environ["RANK"])


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = fastps.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 64)
    step = 0
    while True:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        step += 1
        if step == 3:
            with open(f"{out}.ready.{RANK}", "w") as f:
                f.write("ok")
        time.sleep(0.01)


if __name__ == "__main__":
    main()
