"""vae_fast.gaussian_log_prob against torch.distributions.Normal."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import (
    DEVICES,
    EVENT_DIMS,
    EXACT_DTYPES,
    FLOAT_DTYPES,
    HAS_CUDA,
    SHAPES,
    check_against_truth,
    leaf,
    make,
    resolve_event_dims,
    truth_gaussian,
)

import vae_fast

op = vae_fast.gaussian_log_prob


def inputs(
    shape,
    dtype,
    device,
    gen,
    *,
    logvar_shape=None,
    layouts=("contiguous",) * 3,
    grad=(False, True, True),
    lv_low=-2.0,
    lv_high=2.0,
):
    x = make(shape, dtype, device, layouts[0], kind="normal", high=1.5, gen=gen)
    mean = make(shape, dtype, device, layouts[1], kind="normal", high=1.5, gen=gen)
    lv_shape = shape if logvar_shape is None else logvar_shape
    logvar = make(
        lv_shape,
        dtype,
        device,
        layouts[2] if len(lv_shape) else "contiguous",
        low=lv_low,
        high=lv_high,
        gen=gen,
    )
    return {"x": leaf(x, grad[0]), "mean": leaf(mean, grad[1]), "logvar": leaf(logvar, grad[2])}


# dtype x shape on the value path (event_dims=None); event_dims on the 3-d shape.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, shape, event_dims",
    [(dt, shape, None) for dt in FLOAT_DTYPES for shape in SHAPES]
    + [(dt, (3, 5, 17), k) for dt in EXACT_DTYPES for k in EVENT_DIMS if k is not None],
)
def test_matches_distributions(device, dtype, shape, event_dims, gen):
    k = resolve_event_dims(event_dims, len(shape))
    ins = inputs(shape, dtype, device, gen, grad=(True, True, True))
    out = check_against_truth(op, truth_gaussian, ins, dtype, gen=gen, kwargs={"event_dims": k})
    kk = len(shape) - 1 if k is None else k
    assert out.shape == shape[: len(shape) - kk]


# logvar broadcasts to x: its gradient is summed back to its own shape.
BROADCASTS = [
    ((6, 10), ()),  # a 0-d scalar (one learnable variance)
    ((6, 10), (10,)),  # per feature
    ((6, 10), (1, 10)),  # per feature, with the batch dim kept as 1
    ((6, 10), (6, 1)),  # per sample (a size-1 trailing dim)
    ((6, 10), (6, 10)),  # per element
    ((3, 5, 7), (7,)),  # per feature of the last dim only
    ((3, 5, 7), (5, 7)),  # per feature of both event dims
    ((3, 5, 7), (1, 5, 1)),  # broadcast in two places
    ((257, 33), ()),  # a scalar over many rows (one long reduction for its gradient)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape, logvar_shape", BROADCASTS)
def test_logvar_broadcast(device, dtype, shape, logvar_shape, gen):
    ins = inputs(shape, dtype, device, gen, logvar_shape=logvar_shape, grad=(True, True, True))
    check_against_truth(op, truth_gaussian, ins, dtype, gen=gen)
    check_against_truth(op, truth_gaussian, ins, dtype, gen=gen, kwargs={"event_dims": 1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "layouts, logvar_shape",
    [
        (("transposed", "transposed", "transposed"), None),  # all column-major
        (("strided", "contiguous", "strided"), None),  # step-2 slices
        (("expanded", "transposed", "contiguous"), None),  # x broadcast (stride 0)
        (("contiguous", "strided", "expanded"), None),  # logvar a stride-0 view
        (("transposed", "strided", "strided"), (13,)),  # a strided per-feature logvar
    ],
)
def test_layouts(device, dtype, layouts, logvar_shape, gen):
    ins = inputs(
        (7, 13),
        dtype,
        device,
        gen,
        layouts=layouts,
        logvar_shape=logvar_shape,
        grad=(True, True, True),
    )
    check_against_truth(op, truth_gaussian, ins, dtype, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "grad",
    [(False, True, False), (False, False, True), (True, False, False), (False, True, True)],
    ids=["mean", "logvar", "x", "mean+logvar"],
)
def test_grad_subsets(device, dtype, grad, gen):
    ins = inputs((5, 11), dtype, device, gen, logvar_shape=(11,), grad=grad)
    check_against_truth(op, truth_gaussian, ins, dtype, gen=gen)
    op(**ins).sum().backward()
    for name, g in zip(("x", "mean", "logvar"), grad):
        assert (ins[name].grad is not None) == g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape, logvar_shape, event_dims, out_shape",
    [
        ((0, 5), (5,), None, (0,)),  # an empty batch; the per-feature gradient is zeros
        ((0, 5), (), None, (0,)),  # an empty batch with a scalar logvar
        ((4, 0), (0,), None, (4,)),  # empty events: each row sums nothing
    ],
)
def test_empty(device, dtype, shape, logvar_shape, event_dims, out_shape, gen):
    ins = inputs(shape, dtype, device, gen, logvar_shape=logvar_shape, grad=(True, True, True))
    out = op(**ins, event_dims=event_dims)
    assert out.shape == out_shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros(out_shape, dtype=dtype, device=device))
    grads = torch.autograd.grad(out, list(ins.values()), torch.ones_like(out))
    for g, t in zip(grads, ins.values()):
        assert g.shape == t.shape
        assert torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, event_dims, out_shape",
    [
        ((6,), None, (6,)),  # a 1-d input: None keeps the only (batch) dim
        ((6,), 1, ()),  # ... or sums it into a 0-d result
        ((), None, ()),  # a 0-d input
    ],
)
def test_low_rank(device, shape, event_dims, out_shape, gen):
    ins = inputs(shape, torch.float64, device, gen, grad=(True, True, True))
    out = check_against_truth(
        op, truth_gaussian, ins, torch.float64, gen=gen, kwargs={"event_dims": event_dims}
    )
    assert out.shape == out_shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("logvar_value", [80.0, -80.0, 40.0, -40.0])
def test_extreme_logvar(device, dtype, logvar_value, gen):
    # exp(-logvar) must be formed directly: exp(logvar) overflows fp32 at +-89 and
    # 1/exp(80) - or inf/inf - is not what the formula means. With logvar = -80 the
    # residuals must be tiny for the density to be finite at all.
    shape = (4, 9)
    scale = math.exp(0.5 * logvar_value)
    x = make(shape, dtype, device, kind="normal", high=scale, gen=gen)
    mean = make(shape, dtype, device, kind="normal", high=scale, gen=gen)
    logvar = torch.full(shape, logvar_value, dtype=dtype, device=device)
    logvar = logvar + make(shape, dtype, device, low=-0.5, high=0.5, gen=gen)
    ins = {"x": leaf(x), "mean": leaf(mean), "logvar": leaf(logvar)}
    out = check_against_truth(op, truth_gaussian, ins, dtype, gen=gen)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device, gen):
    ins = inputs((4, 9), torch.float64, device, gen, logvar_shape=())
    with torch.no_grad():
        out = op(**ins)
    assert out.grad_fn is None and not out.requires_grad
    want = truth_gaussian(*(t.detach() for t in ins.values()))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_exact_at_mean():
    # At x = mean with logvar = 0 each element is -0.5*log(2*pi).
    x = torch.zeros(2, 5, dtype=torch.float64)
    out = op(x, x.clone(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(
        out, torch.full((2,), -2.5 * math.log(2 * math.pi), dtype=torch.float64), rtol=1e-15, atol=0
    )


# --------------------------------------------------------------------------- bad input


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"`mean` has shape \(3, 5\) but `x` has shape \(3, 4\)"):
        op(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(()))


@pytest.mark.parametrize("logvar_shape", [(5,), (3, 1, 4), (2, 4), (4, 3)])
def test_logvar_not_broadcastable(logvar_shape):
    # A logvar that would grow x (more dims) or does not match its trailing dims.
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"`logvar` has shape {logvar_shape}, which does not broadcast to `x`'s shape (3, 4)"
        ),
    ):
        op(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(logvar_shape))


def test_integer_dtype():
    with pytest.raises(TypeError, match=r"`logvar` has dtype torch.int64; expected a floating"):
        op(torch.randn(3, 4), torch.randn(3, 4), torch.zeros((), dtype=torch.int64))


def test_mixed_dtypes():
    with pytest.raises(
        TypeError, match=r"`logvar` has dtype torch.float64 but `x` has torch.float32"
    ):
        op(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(4, dtype=torch.float64))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"`mean` is on cuda:0 but `x` is on cpu"):
        op(torch.randn(3, 4), torch.randn(3, 4, device="cuda"), torch.zeros(()))


def test_event_dims_out_of_range():
    with pytest.raises(
        ValueError, match=r"`event_dims`=3 is out of range for an input with 2 dims"
    ):
        op(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(()), event_dims=3)
