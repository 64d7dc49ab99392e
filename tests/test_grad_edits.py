"""Gradient edits between backward and step() under 2 ranks (issue 12, Note [Deferred apply]).

After backward each rank's .grad holds the mean of both ranks' gradients, as with DDP, so
GradScaler, clipping by the global norm, masking and hand-set learning rates give what
single-process training on the global batch gives, to float32 rounding, and every rank
holds the same parameters after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import _edits
from _launch import Job, check


def _reference(option: str):
    model, x, y = _edits.model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    log = _edits.run(model, opt, x, y, option, rank=0, world=1)
    return log, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("option,ddp", [(o, False) for o in sorted(_edits.OPTIONS)] + [("scaler", True)])
def test_edits_between_backward_and_step_match_single_process(tmp_path, option, ddp):
    """ddp: the model stays wrapped in DistributedDataParallel (its all-reduce averages, its
    no_sync() accumulates); fastps recognises it and only applies the step on the servers."""
    out = tmp_path / "res"
    with Job(2, ["edits", option, str(out)] + (["ddp"] if ddp else [])) as job:
        check(job.wait())
    res = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    ref_log, ref_params = _reference(option)
    for r in range(2):
        assert res[r]["ddp_seen"] == ddp  # a DDP model's gradients are not pushed (nor averaged) again
        log = res[r]["log"]
        # The norm clip_grad_norm_ saw is the global one; GradScaler decided alike on every rank.
        assert log["norm"] == pytest.approx(ref_log["norm"], rel=1e-5, nan_ok=True)
        assert log["scale"] == ref_log["scale"]
        for p, q in zip(res[r]["params"], ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # float32 summation order
    for a, b in zip(res[0]["params"], res[1]["params"]):
        assert torch.equal(a, b)
    if option == "scaler":  # the inf of step 2 (on rank 1 only) skipped that step on both ranks
        assert ref_log["scale"][2] < ref_log["scale"][1]


def test_a_rank_that_dies_between_backward_and_step_fails_the_others_at_once(tmp_path):
    """The survivor's step() (its APPLY waits for the dead rank's) raises a typed error within
    seconds, not at the deadline (60 s here)."""
    out = tmp_path / "res"
    with Job(2, ["die_between", str(out)], env={"FASTPS_TIMEOUT": "60"}, timeout=90) as job:
        res = job.wait()
    assert res[1].returncode == 9
    assert res[0].returncode == 3, res[0].stderr[-3000:]
    kind, delay, message = Path(f"{out}.0").read_text().split("\n", 2)
    assert kind in ("ConnectionError", "TimeoutError"), message
    assert float(delay) < 10.0, (delay, message)
