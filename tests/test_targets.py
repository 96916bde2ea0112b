"""Bernoulli targets must be probabilities: values outside [0, 1] raise, clearly.

Raw 0..255 pixels and swapped (recon, x) arguments both give targets outside
[0, 1], for which the "log-likelihood" is unbounded and training silently goes
wrong. The fused ops find them in the pass that reads x; these tests place the
offending element where each part of the kernel reads it (a vector body, a row's
tail, a late row of a parallel chunk), and check the switch that turns it off.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import vae_fast
from vae_fast.nn import ELBOLoss


def _inputs(device, rows=5, cols=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(rows, cols, generator=g).round().to(device, dtype)
    recon = torch.randn(rows, cols, generator=g).to(device, dtype)
    mu = torch.randn(rows, 2, generator=g).to(device, dtype)
    return x, recon, mu, mu.clone()


def _calls(x, recon, mu, logvar, **kw):
    return {
        "elbo": lambda: vae_fast.elbo(recon, x, mu, logvar, **kw),
        "bernoulli_log_prob": lambda: vae_fast.bernoulli_log_prob(x, recon, **kw),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "where",
    [
        # 37 columns: two whole vectors and a tail of 5 for 16 lanes (AVX-512 float32,
        # any capability's bfloat16), four and a tail of 5 for 8 (AVX2 float32).
        (0, 0),  # the first vector of the first row
        (4, 36),  # the last element: a row's tail
        (2, 21),  # inside a vector past the first, a middle row
    ],
)
@pytest.mark.parametrize("value", [-0.5, 1.5, 255.0])
def test_a_target_outside_the_unit_interval_raises(device, dtype, where, value):
    x, recon, mu, logvar = _inputs(device, dtype=dtype)
    x[where] = value
    for call in _calls(x, recon, mu, logvar).values():
        with pytest.raises(ValueError, match=r"`x` holds Bernoulli targets outside \[0, 1\]"):
            call()
        with vae_fast.backend("reference"), pytest.raises(ValueError, match="`x`"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_a_late_row_of_a_large_batch_is_checked(device):
    # Many rows: the parallel loop splits them into chunks; the last chunk is checked too.
    x, recon, mu, logvar = _inputs(device, rows=4097, cols=64)
    x[-1, -1] = 2.0
    with pytest.raises(ValueError, match="max 2"):
        vae_fast.elbo(recon, x, mu, logvar)


@pytest.mark.parametrize("device", DEVICES)
def test_swapped_arguments_raise(device):
    # The silent failure this guards against: elbo(x, recon, ...) with logits as targets.
    x, recon, mu, logvar = _inputs(device)
    with pytest.raises(ValueError, match=r"elbo\(recon, x, mu, logvar\)"):
        vae_fast.elbo(x, recon, mu, logvar)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_grad_validates(device):
    x, recon, mu, logvar = _inputs(device)
    x[0, 0] = 3.0
    weight = torch.randn(37, 37, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="`x`"):
        vae_fast.elbo(recon @ weight, x, mu, logvar, inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_edges_nan_and_soft_targets_pass(device):
    x, recon, mu, logvar = _inputs(device)
    x[0] = torch.linspace(0, 1, 37)  # soft targets, including 0 and 1 exactly
    x[1, 3] = float("nan")  # a NaN target propagates to a NaN row, as before
    x[2, 5] = -0.0  # 0 (its bits exceed 1.0's: the kernels' fast check rescans, and passes it)
    _, ll, _ = vae_fast.elbo(recon, x, mu, logvar, reduction="none")
    assert ll[1].isnan() and ll[[0, 2, 3, 4]].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
# float32 takes the bit-maximum check on AVX2/AVX-512; float64 (and every dtype on the
# DEFAULT capability) the generic min/max one, in which a NaN poisons the lane instead.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_does_not_hide_a_target_out_of_range(device, dtype):
    # The CPU kernels keep a per-lane range of x over rows: column 1 holds a NaN and a 2.0
    # in one lane; the NaN must not hide the 2.0.
    x, recon, mu, logvar = _inputs(device, dtype=dtype)
    x[1, 1] = float("nan")
    x[2, 1] = 2.0
    with pytest.raises(ValueError, match="`x`"):
        vae_fast.elbo(recon, x, mu, logvar)


@pytest.mark.parametrize("device", DEVICES)
def test_validation_can_be_turned_off(device):
    x, recon, mu, logvar = _inputs(device)
    x[0, 0] = 255.0
    with vae_fast.backend("reference"):
        want = vae_fast.elbo(recon, x, mu, logvar, validate_args=False)[0]
    for call in _calls(x, recon, mu, logvar, validate_args=False).values():
        call()
    torch.testing.assert_close(vae_fast.elbo(recon, x, mu, logvar, validate_args=False)[0], want)
    vae_fast.set_default_validate_args(False)
    try:
        for call in _calls(x, recon, mu, logvar).values():
            call()
        with pytest.raises(ValueError):  # a call that asks still checks
            vae_fast.elbo(recon, x, mu, logvar, validate_args=True)
    finally:
        vae_fast.set_default_validate_args(True)
    with pytest.raises(TypeError, match="validate_args"):
        vae_fast.elbo(recon, x, mu, logvar, validate_args="no")


def test_the_gaussian_likelihood_takes_any_real_x():
    x, recon, mu, logvar = _inputs("cpu")
    x[0, 0] = 255.0
    got = vae_fast.elbo(recon, x, mu, logvar, likelihood="gaussian")
    with vae_fast.backend("reference"):
        want = vae_fast.elbo(recon, x, mu, logvar, likelihood="gaussian")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_targets_are_refused_by_the_function_and_the_module(dtype):
    # ELBOLoss used to convert integer x to float, so 0..255 pixels became targets of
    # 255; it now gives the function's own dtype error, even for 0/1 integers.
    x, recon, mu, logvar = _inputs("cpu")
    xi = x.to(dtype)
    for call in (
        lambda: vae_fast.elbo(recon, xi, mu, logvar),
        lambda: ELBOLoss()(recon, xi, mu, logvar),
    ):
        with pytest.raises(TypeError, match="`x` has dtype"):
            call()
