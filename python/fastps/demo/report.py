"""Summaries, the comparison and the loss plot of the runs in one log directory.

A log directory holds one sub-directory per run (``fastps/``, ``ddp/``), each
with ``run.json`` and ``metrics.jsonl`` written by the training script.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

RUN_ORDER = ("fastps", "ddp")


@dataclass
class Run:
    name: str
    info: Dict[str, Any]
    train: List[Dict[str, Any]] = field(default_factory=list)
    val: List[Dict[str, Any]] = field(default_factory=list)
    sample: str = ""


def read_run(run_dir: Path) -> Optional[Run]:
    """The run in ``run_dir``, or None if it has no metrics."""
    mpath = run_dir / "metrics.jsonl"
    if not mpath.exists():
        return None
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    run = Run(run_dir.name, info)
    with open(mpath) as f:
        for line in f:
            if not line.strip():
                continue
            m = json.loads(line)
            (run.val if "val_loss" in m else run.train).append(m)
    sp = run_dir / "sample.txt"
    if sp.exists():
        run.sample = sp.read_text(errors="replace")
    return run if run.train else None


def read_runs(logdir: Path) -> Dict[str, Run]:
    runs = {}
    for name in RUN_ORDER:
        r = read_run(Path(logdir) / name)
        if r is not None:
            runs[name] = r
    return runs


def summarize(run: Run) -> Dict[str, Any]:
    """Time per step (median), throughput, final losses and wall time of one run."""
    dts = [m["dt"] for m in run.train]
    med = statistics.median(dts)
    tail = [m["loss"] for m in run.train[-10:]]
    moved = [m for m in run.train if "sent" in m]
    mb = ((moved[-1]["sent"] - moved[0]["sent"] + moved[-1]["received"] - moved[0]["received"])
          / (len(moved) - 1) / 1e6) if len(moved) > 1 else None
    return {
        "run": run.name,
        "mode": run.info.get("mode", "?"),
        "workers": run.info.get("workers", 1),
        "steps": len(run.train),
        "ms_per_step": med * 1e3,
        "tokens_per_s": run.info.get("tokens_per_step", 0) / med if med > 0 else 0.0,
        "first_train_loss": run.train[0]["loss"],
        "final_train_loss": sum(tail) / len(tail),  # mean of the last 10 steps (one step is noisy)
        "final_val_loss": run.val[-1]["val_loss"] if run.val else None,
        "train_time_s": sum(dts),
        "wall_time_s": max(m["time"] for m in run.train + run.val),
        "rank0_MB_per_step": mb,  # rank 0 client's bytes sent + received over its transport; None for DDP
    }


def agreement(a: Run, b: Run) -> Dict[str, Any]:
    """Largest absolute difference of two runs' train and validation losses at equal steps."""
    tb = {m["step"]: m["loss"] for m in b.train}
    vb = {m["step"]: m["val_loss"] for m in b.val}
    dtrain = [abs(m["loss"] - tb[m["step"]]) for m in a.train if m["step"] in tb]
    dval = [abs(m["val_loss"] - vb[m["step"]]) for m in a.val if m["step"] in vb]
    worst = max(range(len(dtrain)), key=dtrain.__getitem__) if dtrain else None
    return {
        "steps_compared": len(dtrain),
        "max_abs_diff_train": max(dtrain) if dtrain else None,
        "at_step": [m["step"] for m in a.train if m["step"] in tb][worst] if worst is not None else None,
        "max_abs_diff_val": max(dval) if dval else None,
    }


def format_table(summaries: List[Dict[str, Any]]) -> str:
    head = f"{'run':<8} {'mode':<10} {'workers':>7} {'steps':>5} {'ms/step':>8} {'tokens/s':>9} " \
           f"{'train loss':>10} {'val loss':>9} {'wall s':>7} {'MB/step':>8}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "-"
        mb = f"{s['rank0_MB_per_step']:.2f}" if s.get("rank0_MB_per_step") is not None else "-"
        lines.append(f"{s['run']:<8} {s['mode']:<10} {s['workers']:>7} {s['steps']:>5} {s['ms_per_step']:>8.1f} "
                     f"{s['tokens_per_s']:>9,.0f} {s['final_train_loss']:>10.4f} {val:>9} "
                     f"{s['wall_time_s']:>7.1f} {mb:>8}")
    lines.append("(ms/step: median; train loss: mean of the last 10 steps; val loss: the last evaluation; "
                 "MB/step: rank 0's fastps bytes sent + received through shared memory or TCP)")
    return "\n".join(lines)


def plot(runs: Dict[str, Run], path: Path) -> Path:
    """Training and validation loss vs step and vs wall time, every run in one figure (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fastps": "tab:blue", "ddp": "tab:orange"}
    both = "fastps" in runs and "ddp" in runs
    fig, axes = plt.subplots(1, 3 if both else 2, figsize=(15 if both else 11, 4), dpi=90)
    for name, run in runs.items():
        c = colors.get(name, None)
        label = f"{name} ({run.info.get('mode', '?')}, {run.info.get('workers', 1)} workers)"
        steps = [m["step"] for m in run.train]
        times = [m["time"] for m in run.train]
        loss = [m["loss"] for m in run.train]
        vsteps = [m["step"] for m in run.val]
        vtimes = [m["time"] for m in run.val]
        vloss = [m["val_loss"] for m in run.val]
        dashed = "--" if name == "ddp" else "-"
        for ax, xs, vxs in ((axes[0], steps, vsteps), (axes[1], times, vtimes)):
            ax.plot(xs, loss, dashed, color=c, lw=1.0, alpha=0.8, label=f"train: {label}")
            if vloss:
                ax.plot(vxs, vloss, dashed, color=c, marker="o", ms=4, lw=1.5, label=f"val: {name}")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time since the start of training (s)")
    for ax in axes[:2]:
        ax.set_ylabel("loss (nats per byte)")
        ax.grid(alpha=0.3)
    if both:
        ddp = {m["step"]: m["loss"] for m in runs["ddp"].train}
        pairs = [(m["step"], abs(m["loss"] - ddp[m["step"]])) for m in runs["fastps"].train if m["step"] in ddp]
        ax = axes[2]
        # exact equality (0) cannot be drawn on a log axis: show it at the float32 epsilon
        ax.semilogy([s for s, _ in pairs], [max(d, 1.2e-7) for _, d in pairs], color="tab:green", lw=1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("|train loss fastps - ddp|")
        ax.set_title("agreement of the two runs", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    first = next(iter(runs.values()))
    p = first.info.get("params")
    fig.suptitle("byte-level GPT on Python's stdlib source"
                 + (f" ({p / 1e6:.2f}M params, batch {first.info.get('batch_size')} x "
                    f"{first.info.get('model', {}).get('context')})" if p else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def finish(logdir: Path, *, stream: Optional[TextIO] = None, plot_path: Optional[Path] = None) -> Dict[str, Any]:
    """Plot every run of ``logdir``, print the summary table (and the agreement of two
    runs), write ``summary.json``; returns what it wrote."""
    logdir = Path(logdir)
    runs = read_runs(logdir)
    if not runs:
        raise FileNotFoundError(f"no runs with metrics under {logdir}")
    summaries = [summarize(r) for r in runs.values()]
    out: Dict[str, Any] = {"runs": summaries}
    if "fastps" in runs and "ddp" in runs:
        out["agreement"] = agreement(runs["fastps"], runs["ddp"])
    png = plot(runs, plot_path or logdir / "loss.png")
    out["plot"] = str(png)
    (logdir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    if stream is not None:
        print("", file=stream)
        print(format_table(summaries), file=stream)
        if "agreement" in out:
            a = out["agreement"]
            print(f"fastps vs ddp: max |train loss difference| = {a['max_abs_diff_train']:.3g} over "
                  f"{a['steps_compared']} steps (largest at step {a['at_step']}); max |val loss difference| = "
                  + (f"{a['max_abs_diff_val']:.3g}" if a["max_abs_diff_val"] is not None else "-"), file=stream)
        print(f"plot: {png}", file=stream)
        print(f"TensorBoard: tensorboard --logdir {logdir}", file=stream)
        stream.flush()
    return out
