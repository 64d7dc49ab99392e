"""fastps._C.uniform_scale, the check that tells a uniform scale of the gradient (clipping,
unscaling) from any other edit (Note [Deferred apply]), against a per-element reference.

The kernel works in blocks of 4096 elements with vectorised loops; an edit must be found in
any block and at any position within one, and a chain of scales only within 2 ulps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastps import _C


def scale(edited: torch.Tensor, mean: torch.Tensor) -> float:
    return _C.uniform_scale(edited.data_ptr(), edited.numel(), mean.data_ptr(), mean.numel())


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between float32 arrays (-0 one below +0)."""
    def ordered(x: np.ndarray) -> np.ndarray:
        v = x.view(np.int32).astype(np.int64)
        return np.where(v < 0, -(v & 0x7FFFFFFF) - 1, v)
    return np.abs(ordered(a) - ordered(b))


def _check_reference(edited: torch.Tensor, mean: torch.Tensor, s: float) -> None:
    """What a returned factor promises: every element of mean * s within 2 ulps of edited."""
    got = (mean * torch.tensor(s, dtype=torch.float32)).numpy()
    assert _ulps(got, edited.numpy()).max() <= 2


@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 100_003])
def test_exact_factor_is_found_and_reproduces_the_bits(n):
    g = torch.Generator().manual_seed(n)
    mean = torch.randn(n, generator=g)
    for c in (0.37170001864433289, 1.0, 2.0 ** -16, 1e-6, 3.0):
        edited = mean * torch.tensor(c, dtype=torch.float32)  # as torch._foreach_mul_ / clip_grad_norm_
        s = scale(edited, mean)
        assert torch.equal(mean * torch.tensor(s, dtype=torch.float32), edited), (n, c, s)


@pytest.mark.parametrize("where", [0, 1, 4095, 4096, 8191, 50_000, 99_999])
def test_one_changed_element_anywhere_is_not_a_scale(where):
    mean = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    edited = mean * 0.5
    edited[where] = torch.nextafter(edited[where], torch.tensor(math.inf)) * 1.001  # a few ulps off
    assert math.isnan(scale(edited, mean))
    edited[where] = 0.0  # masking one element
    if mean[where] != 0:
        assert math.isnan(scale(edited, mean))


def test_chain_of_scales_within_two_ulps():
    mean = torch.randn(20_000, generator=torch.Generator().manual_seed(2))
    edited = mean.clone().mul_(0.1).mul_(0.3717)  # unscale by a non-power of 2, then clip
    s = scale(edited, mean)
    assert math.isfinite(s) and abs(s - 0.03717) < 1e-6
    _check_reference(edited, mean, s)
    edited.mul_(1.0 + 1e-5)  # now tens of ulps away somewhere: refused
    edited[123] *= 1.01
    assert math.isnan(scale(edited, mean))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where,in_mean", [(0, True), (9000, True), (9000, False), (99_999, False)])
def test_non_finite_values_give_nan(bad, where, in_mean):
    mean = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    edited = mean * 0.25
    (mean if in_mean else edited)[where] = bad
    assert math.isnan(scale(edited, mean))


def test_non_finite_value_after_a_failed_candidate_block_gives_nan():
    """Once no exact factor fits, the rest is still checked for infinities."""
    mean = torch.randn(50_000, generator=torch.Generator().manual_seed(4))
    edited = mean.clone().mul_(0.1).mul_(0.3717)
    edited[40_000] = math.inf
    assert math.isnan(scale(edited, mean))


def test_zero_mean():
    mean = torch.zeros(5000)
    assert scale(torch.zeros(5000), mean) == 1.0
    edited = torch.zeros(5000)
    edited[4999] = 1e-30
    assert math.isnan(scale(edited, mean))
    mean[3] = -0.0  # -0 * s == 0: a scale of zeros is still a scale
    assert scale(torch.zeros(5000), mean) == 1.0


def test_zeros_in_the_mean_where_edited_is_not_zero():
    mean = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    mean[0:100] = 0.0
    edited = mean * 0.5
    edited[50] = 1e-3
    assert math.isnan(scale(edited, mean))


def test_negative_and_sign_flipping_factors():
    mean = torch.randn(10_000, generator=torch.Generator().manual_seed(6))
    for c in (-1.0, -0.5, 0.0):
        edited = mean * torch.tensor(c, dtype=torch.float32)
        s = scale(edited, mean)
        assert torch.equal(mean * torch.tensor(s, dtype=torch.float32), edited), c
