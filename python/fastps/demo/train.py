"""Train the byte-level GPT on the standard library's source, data-parallel through fastps.

An ordinary training script (``examples/train_gpt.py`` runs it; so does ``fastps demo``)::

    python examples/train_gpt.py                                # one process: embedded server
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py      # 2 workers, 2 colocated servers
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --backend ddp   # the DDP reference

The only fastps-specific line is the optimizer: ``fastps.optim.AdamW`` where
the DDP reference uses ``torch.optim.AdamW`` (and wraps the model in
``DistributedDataParallel``). The consistency model comes from the job's
``FASTPS_STALENESS`` (0 BSP, k SSP, -1 ASP).

Every worker takes its share of the same global batch (a pure function of
``(seed, step)``), so BSP training on W workers equals training on one. Rank 0
logs to ``<logdir>/<backend>/``: ``metrics.jsonl``, TensorBoard events,
``run.json``, ``ckpt.pt`` (every ``--save-every`` steps, written atomically)
and, at the end, ``sample.txt``.

A run whose ``<logdir>/<backend>/ckpt.pt`` exists continues from it (metrics and
TensorBoard curves continue at the checkpoint's step), so rerunning the same
command, or torchrun restarting a failed attempt (``--max-restarts``), resumes
instead of starting over; ``--no-resume`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import fastps
from fastps import _config
from fastps.demo.data import Corpus, load_corpus, train_batch, val_batch, val_windows
from fastps.demo.model import GPT, GPTConfig

BACKENDS = ("fastps", "ddp")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The training flags, shared by this script and ``fastps demo``."""
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="global batch in sequences, split evenly over the workers (default 32)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decay ends at lr * this (default 0.1)")
    g.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default 20)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on matrices and embeddings (default 0.1)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="clip gradients to this global norm after backward, as LLM training does (default 1.0; "
                        "0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    g.add_argument("--data-bytes", type=int, default=4_000_000,
                   help="bytes of standard library source to read (default 4000000)")
    m = p.add_argument_group("model")
    m.add_argument("--context", type=int, default=128, help="sequence length in bytes (default 128)")
    m.add_argument("--n-layer", type=int, default=4, help="Transformer blocks (default 4)")
    m.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    m.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    m.add_argument("--untied", action="store_true", help="do not tie the output head to the token embedding")
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--logdir", default=None, help="run directory (default runs/<timestamp>)")
    o.add_argument("--eval-every", type=int, default=25,
                   help="validation loss every N steps, and at the end; 0 disables (default 25)")
    o.add_argument("--eval-batches", type=int, default=4,
                   help="validation windows = this * batch size (default 4)")
    o.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every K steps (and at the end) to <logdir>/<backend>/ckpt.pt; 0 never")
    r = o.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true",
                   help="without --logdir: continue the newest runs/* that has a checkpoint (a run "
                        "continues from <logdir>/<backend>/ckpt.pt anyway when it exists)")
    r.add_argument("--no-resume", action="store_true",
                   help="start from step 0 even when <logdir>/<backend>/ckpt.pt exists (its metrics "
                        "and TensorBoard curves are replaced)")
    o.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, as if interrupted (the schedule still spans --steps)")
    o.add_argument("--sample-bytes", type=int, default=300, help="bytes to generate at the end (default 300)")
    o.add_argument("--prompt", default="def ", help="prompt of the generated sample (default 'def ')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gpt.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="fastps",
                   help="fastps.optim.AdamW through the parameter server, or torch DDP + torch.optim.AdamW")
    p.add_argument("--no-report", action="store_true",
                   help="skip the plot and summary table at the end (fastps demo makes them)")
    add_training_arguments(p)
    return p


def check_arguments(args: argparse.Namespace, world_size: int) -> Optional[str]:
    """A message for the first invalid setting, or None."""
    for name in ("steps", "batch_size", "context", "n_layer", "n_head", "d_model"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    for name in ("warmup", "eval_every", "eval_batches", "save_every", "sample_bytes"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0"
    if args.batch_size % world_size:
        return f"--batch-size {args.batch_size} must be divisible by the {world_size} workers"
    if args.d_model % args.n_head:
        return f"--n-head {args.n_head} must divide --d-model {args.d_model}"
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        return "--stop-after must be in [1, --steps]"
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        return "--min-lr-ratio must be in [0, 1]"
    return None


def lr_factor(steps: int, warmup: int, min_ratio: float):
    """Linear warmup, then cosine decay to ``min_ratio`` at ``steps``: a LambdaLR factor."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def default_logdir() -> str:
    """``runs/<timestamp>``; under torchrun ``runs/torchrun-<run id>``, the same in every
    attempt of the job, so that an attempt torchrun restarts finds the checkpoint."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return os.path.join("runs", f"torchrun-{run_id}")
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def find_resume_logdir(backend: str) -> Optional[str]:
    """The newest runs/<dir> holding a checkpoint of ``backend``."""
    found = sorted(glob.glob(os.path.join("runs", "*", backend, "ckpt.pt")))
    return str(Path(found[-1]).parent.parent) if found else None


# -- reductions across workers -------------------------------------------------------

class LocalReducer:
    """One process (or an asynchronous job): every number is this rank's own."""

    sync = True

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size

    def start(self, values: List[float]) -> Any:
        return list(values)

    def finish(self, handle: Any) -> List[float]:
        return handle

    def sum(self, values: List[float]) -> List[float]:
        return self.finish(self.start(values))

    def barrier(self) -> None:
        pass


class FastPSReducer(LocalReducer):
    """Sums small vectors over the workers with ``fastps.Client.push_pull``.

    Only used under BSP: a push_pull completes once every worker pushed, so in
    SSP/ASP it would make the workers wait for each other every step.
    """

    def __init__(self, world_size: int, sync: bool) -> None:
        super().__init__(world_size)
        self.sync = sync
        self.client = fastps.Client()
        self.keys = {n: self.client.register(torch.zeros(n), aggregate=True) for n in (1, 2)}

    def start(self, values: List[float]) -> Any:
        if not self.sync:
            return list(values)  # this rank's own numbers: no waiting for the others
        t = torch.tensor(values, dtype=torch.float32)
        return self.client.push_pull(self.keys[len(values)], t), t

    def finish(self, handle: Any) -> List[float]:
        if not self.sync:
            return handle
        fut, t = handle
        fut.wait()
        return t.tolist()

    def barrier(self) -> None:
        t = torch.zeros(1)
        self.client.push_pull(self.keys[1], t).wait()  # completes once every worker pushed


class DDPReducer(LocalReducer):
    """Sums with torch.distributed.all_reduce (gloo)."""

    def start(self, values: List[float]) -> Any:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        return dist.all_reduce(t, async_op=True), t

    def finish(self, handle: Any) -> List[float]:
        work, t = handle
        work.wait()
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def traffic() -> Optional[Dict[str, int]]:
    """This worker's fastps client transport counters (bytes and messages sent and
    received), or None when this process has not joined a distributed fastps job.

    Requests to the server colocated in this process skip the transport and are
    not counted. There is no public accessor yet: this reads the private cluster
    object, without creating one.
    """
    try:
        from fastps import _cluster

        cl = getattr(_cluster, "_cluster", None)
        return dict(cl.client.stats()) if cl is not None and cl.client is not None else None
    except Exception:  # noqa: BLE001 - counters are informational only
        return None


# -- the pieces of the loop --------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices and embeddings, none on biases and LayerNorm (as nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, starts: torch.Tensor, args: argparse.Namespace, rank: int,
             world: int, reducer: LocalReducer) -> Optional[float]:
    """Mean validation loss over the fixed windows (split over the ranks when synchronous)."""
    if reducer.sync:
        mine = starts[rank::world]
    elif rank == 0:
        mine = starts
    else:
        return None
    total = 0.0
    for chunk in mine.split(args.batch_size):
        x, y = val_batch(corpus.val, chunk, args.context)
        _, loss = model(x, y)
        total += loss.item() * len(chunk)
    s, n = reducer.sum([total, float(len(mine))]) if reducer.sync else (total, float(len(mine)))
    return s / max(n, 1.0)


def _tmp_name(path: Path) -> Path:
    """The temporary file ``path`` is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename, fsync the
    directory. If writing fails (a full disk), the temporary file is removed and the
    previous checkpoint stays as it was; the error propagates."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened for fsync: the rename stands
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def remove_stale_temporary_files(run_dir: Path) -> None:
    """Remove the temporary files (``.ckpt.pt.tmp<pid>``, ``.metrics.jsonl.tmp<pid>``) an
    earlier attempt left in ``run_dir`` when it was killed while writing one (only rank 0
    writes there, one job at a time)."""
    for tmp in run_dir.glob(".*.tmp*"):
        if tmp.name.rpartition(".tmp")[2].isdigit():
            try:
                tmp.unlink()
            except OSError:
                pass


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The rows of a metrics file; a line cut short (the process was killed while writing
    it) is skipped."""
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def continue_metrics(path: Path, start: int):
    """Open the metrics file for appending after keeping only its rows of steps before
    ``start`` (a resumed run redoes the later ones; a fresh one keeps none). The kept rows
    are rewritten atomically, so a kill at any moment leaves a usable file."""
    kept = [m for m in read_metrics(path) if isinstance(m, dict) and m.get("step", start) < start]
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        for m in kept:
            f.write(json.dumps(m) + "\n")
    os.replace(tmp, path)
    return open(path, "a")


def load_resume_checkpoint(path: Path, cfg: GPTConfig, args: argparse.Namespace) -> Dict[str, Any]:
    """Read ``path`` and check it was written with this run's model, seed and batch size;
    raises ValueError saying what differs."""
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    if ckpt["model_config"] != cfg.to_dict() or ckpt["seed"] != args.seed \
            or ckpt["batch_size"] != args.batch_size:
        raise ValueError(f"{path} was written with different settings ({ckpt['model_config']}, seed "
                         f"{ckpt['seed']}, batch {ckpt['batch_size']})")
    return ckpt


def generate_sample(model: GPT, prompt: str, n: int, seed: int) -> str:
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, n, temperature=0.8, top_k=40, generator=g)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


# -- the script -------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    err = check_arguments(args, world)
    if err:
        print(f"train_gpt: {err}", file=sys.stderr)
        return 2
    return train(args, rank, world)


def train(args: argparse.Namespace, rank: int, world: int) -> int:
    """Run the training described by the parsed flags as rank ``rank`` of ``world``; returns
    the exit status. Rank 0's log files are closed also when training fails (a full disk,
    a lost peer)."""
    with contextlib.ExitStack() as closing:
        return _train(args, rank, world, closing)


def _train(args: argparse.Namespace, rank: int, world: int, closing: contextlib.ExitStack) -> int:
    backend = args.backend
    staleness = _config.resolve("staleness") if backend == "fastps" else 0
    mode = {0: "bsp", -1: "asp"}.get(staleness, f"ssp(k={staleness})") if world > 1 else "single"
    clip = args.clip
    if clip > 0 and world > 1 and staleness != 0:
        # Under SSP/ASP each gradient is applied as it arrives: no global norm to clip by.
        if rank == 0:
            print(f"train_gpt: --clip {clip} needs BSP (FASTPS_STALENESS=0); training without clipping",
                  file=sys.stderr)
        clip = 0.0
    if backend == "ddp":
        mode = "ddp" if world > 1 else "single"

    logdir = args.logdir
    if args.resume and not logdir:
        logdir = find_resume_logdir(backend)
        if logdir is None and rank == 0:
            print(f"train_gpt: --resume: no runs/*/{backend}/ckpt.pt found; starting from step 0", flush=True)
    if not logdir:
        logdir = default_logdir()
    run_dir = Path(logdir) / backend
    ckpt_path = run_dir / "ckpt.pt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(run_dir)

    # Same model and data on every rank; fastps and DDP both start all ranks from rank 0's values.
    corpus = load_corpus(args.data_bytes)
    cfg = GPTConfig(context=args.context, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                    tie_weights=not args.untied)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    # Every rank reads the checkpoint (on several hosts --logdir must be on a shared file system).
    ckpt = None
    if not args.no_resume and ckpt_path.exists():
        try:
            ckpt = load_resume_checkpoint(ckpt_path, cfg, args)
        except ValueError as e:
            print(f"train_gpt: cannot resume: {e}; pass --no-resume to start over, or another --logdir",
                  file=sys.stderr)
            return 2
        model.load_state_dict(ckpt["model"])  # the model first: the optimizer pushes these values

    net: torch.nn.Module = model
    if backend == "fastps":
        # The one-line swap: torch.optim.AdamW -> fastps.optim.AdamW.
        opt = fastps.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
        reducer: LocalReducer = FastPSReducer(world, sync=staleness == 0) if world > 1 else LocalReducer()
    else:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if world > 1:
            dist.init_process_group("gloo")
            net = DistributedDataParallel(model)
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
        reducer = DDPReducer(world) if world > 1 else LocalReducer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.steps, args.warmup, args.min_lr_ratio))

    start, elapsed0 = 0, 0.0
    if world > 1 and reducer.sync:
        # Every rank must resume from the same step (or none): one summed vector says.
        has, step_sum = reducer.sum([1.0 if ckpt is not None else 0.0,
                                     float(ckpt["step"]) if ckpt is not None else 0.0])
        mine = int(ckpt["step"]) if ckpt is not None else 0
        if has not in (0.0, float(world)) or step_sum != world * mine:
            print(f"train_gpt: rank {rank}: the workers disagree about {ckpt_path} ({int(has)} of {world} "
                  "found it, or at different steps); on several hosts --logdir must be a shared file system",
                  file=sys.stderr)
            return 2
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])  # fastps: also sends this rank's parameters to the servers
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start, elapsed0 = int(ckpt["step"]), float(ckpt["elapsed"])
        reducer.barrier()  # every rank has restored before anyone trains
    stop = args.stop_after if args.stop_after is not None else args.steps
    tokens_per_step = args.batch_size * args.context
    val_starts = val_windows(corpus.val, count=args.eval_batches * args.batch_size, context=args.context)

    writer = bar = metrics = None
    if rank == 0:
        servers = 0
        if backend == "fastps" and world > 1:
            servers = (world if _config.resolve("colocate") else 0) + _config.resolve("num_servers")
        info = {
            "backend": backend, "mode": mode, "workers": world, "staleness": staleness, "clip": clip,
            "servers": servers,
            "params": model.num_params(), "model": cfg.to_dict(), "batch_size": args.batch_size,
            "tokens_per_step": tokens_per_step, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
            "seed": args.seed, "start_step": start,
            "data": {"root": corpus.root, "files": corpus.files, "val_files": corpus.val_files,
                     "train_bytes": corpus.train.numel(), "val_bytes": corpus.val.numel()},
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "fastps": fastps.__version__,
        }
        (run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
        # Metrics of steps before `start` stay (a resumed run continues its curve); TensorBoard
        # hides the earlier attempts' events from `start` on.
        metrics = closing.enter_context(continue_metrics(run_dir / "metrics.jsonl", start))
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        writer = SummaryWriter(str(run_dir), purge_step=start)
        closing.callback(writer.close)
        if ckpt is not None:
            print(f"[{backend}] resuming from {ckpt_path} at step {start}", flush=True)
        print(f"[{backend}] {mode}, {world} worker(s); GPT {model.num_params() / 1e6:.2f}M params "
              f"({args.n_layer} layers, d={args.d_model}, context {args.context}); batch {args.batch_size} "
              f"x {args.context} bytes; {corpus.train.numel() / 1e6:.1f} MB train / "
              f"{corpus.val.numel() / 1e6:.2f} MB val from {corpus.files} stdlib files; "
              f"steps {start}..{stop} of {args.steps}; logging to {run_dir}", flush=True)
        tty = sys.stderr.isatty()
        bar = tqdm(total=args.steps, initial=start, desc=f"{backend} {mode} x{world}", unit="step",
                   dynamic_ncols=True, mininterval=0.5 if tty else 10.0, file=sys.stderr)
        closing.callback(bar.close)

    def log(row: Dict[str, Any]) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    def do_eval(step: int) -> None:
        v = evaluate(model, corpus, val_starts, args, rank, world, reducer)
        if rank == 0:
            t = time.perf_counter() - t_start
            log({"step": step, "val_loss": v, "time": t})
            writer.add_scalar("loss/val", v, step)
            bar.set_postfix_str(f"val {v:.3f}", refresh=False)

    def checkpoint(step: int) -> None:
        payload = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "elapsed": time.perf_counter() - t_start, "rng": torch.get_rng_state(),
            "seed": args.seed, "batch_size": args.batch_size, "model_config": cfg.to_dict(),
            "data": {"sampler": "pure function of (seed, step)", "next_step": step},
        }
        save_checkpoint(ckpt_path, payload)

    t_start = time.perf_counter() - elapsed0
    base = traffic()
    last = dict(base) if base else None
    for step in range(start, stop):
        if args.eval_every and step % args.eval_every == 0:
            do_eval(step)
        t0 = time.perf_counter()
        x, y = train_batch(corpus.train, seed=args.seed, step=step, batch_size=args.batch_size,
                           context=args.context, rank=rank, world_size=world)
        opt.zero_grad(set_to_none=True)
        _, loss = net(x, y)
        pending = reducer.start([loss.item()])  # the global mean, overlapped with backward
        loss.backward()
        # After backward .grad holds the mean over ranks (fastps under BSP, as DDP): the global norm.
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if clip > 0 else None
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        total = reducer.finish(pending)[0]
        gl = total / world if reducer.sync else total
        dt = time.perf_counter() - t0
        if rank == 0:
            now = time.perf_counter() - t_start
            row = {"step": step, "loss": gl, "lr": lr, "dt": dt, "time": now,
                   "tokens_per_s": tokens_per_step / dt}
            if gnorm is not None:
                row["grad_norm"] = gnorm
                writer.add_scalar("grad_norm", gnorm, step)
            writer.add_scalar("loss/train", gl, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("perf/tokens_per_s", tokens_per_step / dt, step)
            writer.add_scalar("perf/step_ms", dt * 1e3, step)
            cur = traffic()
            if cur is not None and last is not None:
                row["sent"], row["received"] = cur["bytes_sent"], cur["bytes_received"]
                writer.add_scalar("traffic/sent_MB", cur["bytes_sent"] / 1e6, step)
                writer.add_scalar("traffic/received_MB", cur["bytes_received"] / 1e6, step)
                writer.add_scalar("traffic/sent_MB_per_step", (cur["bytes_sent"] - last["bytes_sent"]) / 1e6, step)
                writer.add_scalar("traffic/received_MB_per_step",
                                  (cur["bytes_received"] - last["bytes_received"]) / 1e6, step)
                writer.add_scalar("traffic/messages_sent", cur["messages_sent"], step)
                last = cur
            log(row)
            bar.set_postfix_str(f"loss {gl:.3f} {tokens_per_step / dt:,.0f} tok/s", refresh=False)
            bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            if rank == 0:
                checkpoint(step + 1)
    finished = stop == args.steps
    if finished and args.eval_every:
        do_eval(args.steps)
    if finished and args.save_every and rank == 0:
        checkpoint(args.steps)

    if rank == 0:
        bar.close()
        writer.flush()
        if finished and args.sample_bytes:
            text = generate_sample(model, args.prompt, args.sample_bytes, args.seed)
            (run_dir / "sample.txt").write_text(text)
            writer.add_text("sample", "```\n" + text + "\n```", args.steps)
        writer.close()
        metrics.close()
        if not args.no_report:
            from fastps.demo import report

            report.finish(Path(logdir), stream=sys.stdout)
    if backend == "ddp" and world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
