"""Train a small GPT on Python's standard library source, data-parallel through fastps.

The same script runs alone or under torchrun; `fastps demo` launches it for you
(see docs/demo.md)::

    python examples/train_gpt.py                                   # one process, embedded server
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py         # 2 workers + 2 servers, BSP
    FASTPS_STALENESS=-1 torchrun --standalone --nproc-per-node 2 examples/train_gpt.py   # ASP
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --backend ddp  # torch DDP reference
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 examples/train_gpt.py --save-every 50 --logdir runs/gpt
                                                                   # a failed attempt resumes from ckpt.pt
    python examples/train_gpt.py --help                            # model size, steps, checkpoints, ...

The training loop is ``fastps.demo.train`` (installed with the package, so that
``fastps demo`` runs exactly this code); the model is ``fastps.demo.model.GPT``
and the data ``fastps.demo.data``. The one fastps-specific line is the optimizer::

    opt = fastps.optim.AdamW(param_groups, lr=..., betas=(0.9, 0.95))   # was torch.optim.AdamW

LR scheduling (``torch.optim.lr_scheduler.LambdaLR``), ``state_dict`` and
``load_state_dict`` are torch's; in the distributed mode ``state_dict()``
fetches the optimizer state from the servers and ``load_state_dict()`` sends it
back with the model's parameters.

A run continues from ``<logdir>/<backend>/ckpt.pt`` whenever that file exists
(``--no-resume`` starts over), so the same command line serves every attempt of
a torchrun job that restarts (docs/distributed.md, "Restarts").
"""

import sys

from fastps.demo.train import main

if __name__ == "__main__":
    sys.exit(main())
