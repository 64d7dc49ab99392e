"""A typical standalone GPT training script, as a user writes one for torchrun + DDP.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/llm_script.py \\
        --optim torch|fastps [--no-ddp] --out result.json

``--optim torch`` is the DDP baseline (``torch.optim.AdamW``); ``--optim fastps``
is the one-line swap (``fastps.optim.AdamW``, everything else identical, the
DDP wrapper kept); ``--no-ddp`` drops the wrapper (fastps alone averages the
gradients; gradient accumulation then uses the optimizer's ``no_sync()``).

Everything else is what nearly every language-model script has: a small GPT
(tied embeddings), byte-level data, AdamW with a weight-decay split (no decay
for biases and LayerNorm weights), linear warmup + cosine lr set by hand in
each group every step, float16 autocast with ``torch.amp.GradScaler``,
``clip_grad_norm_(1.0)``, two micro-batches per step (``no_sync()`` on the
first), and a checkpoint: train ``--steps``, save model/optimizer/scaler state
dicts, build everything fresh, load, train ``--resume-steps`` more.

Rank 0 writes a JSON file: per step the loss (mean over ranks), the gradient
norm clip_grad_norm_ returned, the GradScaler scale and the lr; and every
rank's checksum of its final parameters (float64 sum, sum of absolute values,
sum of squares, sha256 of the bytes). Used by tests/test_llm_script.py; it imports nothing of
fastps's internals.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# -- model (nanoGPT-shaped) ------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, block: int = 32, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss


# -- data: byte-level text from a fixed seed ----------------------------------------------
def make_corpus(seed: int, chars: int = 1 << 15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(letters[int(i)] for i in torch.randint(0, 12, (int(n),), generator=g))
             for n in torch.randint(2, 8, (64,), generator=g)]
    out, size = [], 0
    while size < chars:
        w = words[int(torch.randint(0, len(words), (1,), generator=g))]
        out.append(w)
        size += len(w) + 1
    return torch.tensor(list(" ".join(out).encode()[:chars]), dtype=torch.long)


def get_batch(data: torch.Tensor, step: int, micro: int, batch: int, block: int, rank: int, world: int):
    """This rank's share of the global micro-batch (the same on every run)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
    x = torch.stack([data[i:i + block] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
    per = batch // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def get_lr(it: int, total: int, warmup: int, max_lr: float, min_lr: float) -> float:
    if it < warmup:
        return max_lr * (it + 1) / warmup
    ratio = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optim", choices=["torch", "fastps"], required=True)
    ap.add_argument("--no-ddp", action="store_true", help="no DistributedDataParallel wrapper")
    ap.add_argument("--out", required=True, help="JSON file rank 0 writes")
    ap.add_argument("--steps", type=int, default=6, help="steps before the checkpoint")
    ap.add_argument("--resume-steps", type=int, default=4, help="steps after resuming from it")
    ap.add_argument("--amp", choices=["fp16", "bf16", "off"], default="fp16", help="CPU autocast dtype")
    ap.add_argument("--batch", type=int, default=8, help="global micro-batch (sequences)")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    args = ap.parse_args()

    ddp = not args.no_ddp
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world, ddp = 0, 1, False
    if distributed and not ddp and args.optim == "torch":
        raise SystemExit("--optim torch --no-ddp would train each rank on its own; keep DDP for torch")
    torch.set_num_threads(1)
    torch.manual_seed(1337 + rank)  # as nanoGPT: ranks differ until DDP (or fastps) syncs them
    if args.optim == "fastps":
        import fastps
        AdamW = fastps.optim.AdamW  # the one-line swap
    else:
        AdamW = torch.optim.AdamW
    block, total = 32, args.steps + args.resume_steps
    data = make_corpus(seed=5)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[args.amp]
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext

    def build():
        raw = GPT(block=block)
        decay = [p for p in raw.parameters() if p.dim() >= 2]
        no_decay = [p for p in raw.parameters() if p.dim() < 2]
        return raw, [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]

    def make_optimizer(groups):
        return AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    raw_model, groups = build()
    optimizer = make_optimizer(groups)
    model = nn.parallel.DistributedDataParallel(raw_model) if ddp else raw_model
    # GradScaler on for every --amp (with bf16 or float32 it scales by powers of two: exact).
    # A high initial scale: float16 overflows in the first step and again after the resume,
    # so steps get skipped and the scale backs off.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18, growth_interval=3)
    log = {"loss": [], "norm": [], "scale": [], "lr": []}

    def train(start: int, stop: int) -> None:
        for it in range(start, stop):
            lr = get_lr(it, total, warmup=3, max_lr=3e-3, min_lr=3e-4)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(())
            for micro in range(args.accum):
                x, y = get_batch(data, it, micro, args.batch, block, rank, world)
                if micro == args.accum - 1:
                    quiet = contextlib.nullcontext()
                else:  # gradient accumulation: no communication on this backward
                    quiet = model.no_sync() if ddp else (optimizer.no_sync() if distributed else contextlib.nullcontext())
                with quiet:
                    with autocast():
                        _, loss = model(x, y)
                        loss = loss / args.accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if distributed:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            log["loss"].append(loss_sum.item())
            log["norm"].append(norm.item())
            log["scale"].append(scaler.get_scale())
            log["lr"].append(lr)

    train(0, args.steps)

    # -- checkpoint, then resume into fresh objects -------------------------------------
    ckpt_path = args.out + ".ckpt.pt"
    if rank == 0:
        torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": args.steps}, ckpt_path)
    if distributed:
        dist.barrier()
    del model, raw_model, optimizer, scaler, groups
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    raw_model, groups = build()
    raw_model.load_state_dict(ckpt["model"])
    optimizer = make_optimizer(groups)
    optimizer.load_state_dict(ckpt["optimizer"])
    model = nn.parallel.DistributedDataParallel(raw_model) if ddp else raw_model
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(ckpt["scaler"])
    train(ckpt["step"], total)

    flat = torch.cat([p.detach().reshape(-1) for p in raw_model.parameters()])
    mine = {"sum": flat.double().sum().item(), "abs_sum": flat.double().abs().sum().item(),
            "sumsq": flat.double().pow(2).sum().item(),
            "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest()}
    checksums = [mine]
    if distributed:
        checksums = [None] * world
        dist.all_gather_object(checksums, mine)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"optim": args.optim, "ddp": ddp, "world": world, "amp": args.amp, **log,
                       "checksums": checksums}, f, indent=1)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
