"""vae_fast.bernoulli_log_prob against torch.distributions.Bernoulli."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    DEVICES,
    EVENT_DIMS,
    EXACT_DTYPES,
    FLOAT_DTYPES,
    HAS_CUDA,
    RTOL,
    SHAPES,
    assert_close_exact,
    check_against_truth,
    leaf,
    make,
    resolve_event_dims,
    truth_bernoulli,
)

import vae_fast

op = vae_fast.bernoulli_log_prob


def inputs(
    shape,
    dtype,
    device,
    gen,
    *,
    x_layout="contiguous",
    l_layout="contiguous",
    x_kind="binary",
    grad=(True, True),
):
    x = make(shape, dtype, device, x_layout, kind=x_kind, low=0.0, high=1.0, gen=gen)
    logits = make(shape, dtype, device, l_layout, kind="normal", high=3.0, gen=gen)
    return {"x": leaf(x, grad[0]), "logits": leaf(logits, grad[1])}


# dtype x shape on the value path (event_dims=None); event_dims on the 3-d shape.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, shape, event_dims",
    [(dt, shape, None) for dt in FLOAT_DTYPES for shape in SHAPES]
    + [(dt, (3, 5, 17), k) for dt in EXACT_DTYPES for k in EVENT_DIMS if k is not None],
)
def test_matches_distributions(device, dtype, shape, event_dims, gen):
    k = resolve_event_dims(event_dims, len(shape))
    out = check_against_truth(
        op,
        truth_bernoulli,
        inputs(shape, dtype, device, gen),
        dtype,
        gen=gen,
        kwargs={"event_dims": k},
    )
    kk = len(shape) - 1 if k is None else k
    assert out.shape == shape[: len(shape) - kk]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_targets(device, dtype, gen):
    # x in [0, 1] is a valid target (e.g. grey-level images): the formula is unchanged.
    check_against_truth(
        op, truth_bernoulli, inputs((9, 31), dtype, device, gen, x_kind="uniform"), dtype, gen=gen
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "x_layout, l_layout",
    [
        ("transposed", "transposed"),  # both column-major
        ("strided", "contiguous"),  # x is a step-2 slice, logits dense
        ("contiguous", "expanded"),  # logits broadcast over the batch (stride 0)
        ("expanded", "strided"),  # x broadcast (stride 0), logits sliced
    ],
)
@pytest.mark.parametrize("shape", [(7, 13), (4, 6, 9)])
def test_layouts(device, dtype, x_layout, l_layout, shape, gen):
    ins = inputs(shape, dtype, device, gen, x_layout=x_layout, l_layout=l_layout, x_kind="uniform")
    check_against_truth(op, truth_bernoulli, ins, dtype, gen=gen)
    check_against_truth(op, truth_bernoulli, ins, dtype, gen=gen, kwargs={"event_dims": 1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("grad", [(False, True), (True, False)], ids=["logits", "x"])
def test_grad_of_one_input(device, dtype, grad, gen):
    # Only the gradient that is asked for is computed; the other input gets none.
    ins = inputs((5, 11), dtype, device, gen, grad=grad, x_kind="uniform")
    check_against_truth(op, truth_bernoulli, ins, dtype, gen=gen)
    out = op(**ins)
    out.sum().backward()
    for name, g in zip(("x", "logits"), grad):
        assert (ins[name].grad is not None) == g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape, event_dims, out_shape",
    [
        ((0, 5), None, (0,)),  # an empty batch: an empty result
        ((3, 0), None, (3,)),  # empty events: each row sums nothing, i.e. 0
        ((2, 0, 4), 1, (2, 0)),  # an empty batch dim in the middle
        ((0,), None, (0,)),  # an empty 1-d batch: its gradient has shape (0,) too
    ],
)
def test_empty(device, dtype, shape, event_dims, out_shape, gen):
    ins = inputs(shape, dtype, device, gen)
    out = op(**ins, event_dims=event_dims)
    assert out.shape == out_shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros(out_shape, dtype=dtype, device=device))
    gx, gl = torch.autograd.grad(out, [ins["x"], ins["logits"]], torch.ones_like(out))
    assert gx.shape == shape and gl.shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, event_dims, out_shape",
    [
        ((6,), None, (6,)),  # a 1-d input: None keeps the only (batch) dim
        ((6,), 1, ()),  # ... or sums it into a 0-d result
        ((), None, ()),  # a 0-d input is one element
    ],
)
def test_low_rank(device, shape, event_dims, out_shape, gen):
    ins = inputs(shape, torch.float64, device, gen, x_kind="uniform")
    out = check_against_truth(
        op, truth_bernoulli, ins, torch.float64, gen=gen, kwargs={"event_dims": event_dims}
    )
    assert out.shape == out_shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits(device, dtype):
    # softplus(l) must not overflow (exp(1e4) = inf) nor lose x*l - l (= (x-1)*l) to
    # cancellation: x*l - softplus(l) is exactly x*l - max(l, 0) here, in any dtype.
    big = 1e4
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5, 0.25]], dtype=torch.float64)
    logits = torch.tensor([[big, big, -big, -big, big, -big]], dtype=torch.float64)
    x, logits = x.to(dtype).to(device), logits.to(dtype).to(device)
    logits.requires_grad_(True)
    out = op(x, logits, event_dims=0)
    xd, ld = x.double(), logits.detach().double()
    want = xd * ld - ld.clamp_min(0)
    assert torch.isfinite(out).all()
    assert torch.equal(out.double(), want.to(dtype).double()), (out, want)
    (g,) = torch.autograd.grad(out.sum(), logits)
    # d/dl = x - sigmoid(l) = x - 1 or x - 0, exactly
    assert torch.equal(g.double(), (xd - (ld > 0).double()).to(dtype).double()), g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_logits_propagate(device, dtype):
    # A decoder that emits NaN must show it: NaN values and NaN gradients exactly where the
    # logits are NaN, whatever the target (x = 0 skips the kernels' x*l product). 19 columns:
    # NaN in a 16-wide vector body and in its tail; row 1 has none.
    x = torch.tensor([0.0, 1.0, 0.25, 0.0]).repeat(2, 5)[:, :19]
    logits = torch.linspace(-3, 3, 38).reshape(2, 19)
    nan_at = torch.zeros(2, 19, dtype=torch.bool)
    nan_at[0, [0, 1, 2, 17, 18]] = True
    logits[nan_at] = float("nan")
    x, logits = x.to(device, dtype), leaf(logits.to(device, dtype))
    out = op(x, logits, event_dims=0)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.equal(out.isnan().cpu(), nan_at) and torch.equal(g.isnan().cpu(), nan_at)
    row = op(x, logits.detach())
    assert row[0].isnan() and row[1].isfinite()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("magnitude", [20.0, 40.0, 100.0, 1e4])
def test_large_logits_accuracy(device, dtype, magnitude, gen):
    # Where naive log(1 + exp(l)) overflows (fp32 beyond ~88) or log(sigmoid) underflows.
    shape = (3, 64)
    x = make(shape, dtype, device, kind="uniform", low=0.0, high=1.0, gen=gen)
    logits = make(shape, dtype, device, kind="uniform", low=-magnitude, high=magnitude, gen=gen)
    ins = {"x": x, "logits": leaf(logits)}
    check_against_truth(op, truth_bernoulli, ins, dtype, gen=gen, kwargs={"event_dims": 0})


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device, gen):
    ins = inputs((4, 9), torch.float32, device, gen)
    with torch.no_grad():
        out = op(**ins)
    assert out.grad_fn is None and not out.requires_grad
    assert_close_exact(
        out, truth_bernoulli(ins["x"].double(), ins["logits"].double()), RTOL[torch.float32]
    )


# --------------------------------------------------------------------------- bad input


def test_mismatched_shapes():
    x, logits = torch.rand(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"`logits` has shape \(3, 5\) but `x` has shape \(3, 4\)"):
        op(x, logits)
    with pytest.raises(ValueError, match=r"`logits`.*\(4,\).*\(3, 4\)"):
        op(x, torch.randn(4))  # no silent broadcast


def test_integer_dtype():
    with pytest.raises(TypeError, match=r"`x` has dtype torch.int64; expected a floating dtype"):
        op(torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"`logits` has dtype torch.int32"):
        op(torch.rand(3, 4), torch.ones(3, 4, dtype=torch.int32))


def test_mixed_dtypes():
    with pytest.raises(
        TypeError, match=r"`logits` has dtype torch.float64 but `x` has torch.float32"
    ):
        op(torch.rand(3, 4), torch.randn(3, 4, dtype=torch.float64))


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"`logits` must be a torch.Tensor"):
        op(torch.rand(3, 4), [[0.0] * 4] * 3)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"`logits` is on cuda:0 but `x` is on cpu"):
        op(torch.rand(3, 4), torch.randn(3, 4, device="cuda"))


@pytest.mark.parametrize("event_dims", [-1, 3, 10])
def test_event_dims_out_of_range(event_dims):
    with pytest.raises(
        ValueError,
        match=re.escape(f"`event_dims`={event_dims} is out of range for an input with 2 dims"),
    ):
        op(torch.rand(3, 4), torch.randn(3, 4), event_dims=event_dims)


@pytest.mark.parametrize("event_dims", [1.0, True, "1"])
def test_event_dims_type(event_dims):
    with pytest.raises(TypeError, match=r"`event_dims` must be an int or None"):
        op(torch.rand(3, 4), torch.randn(3, 4), event_dims=event_dims)
