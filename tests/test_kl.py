"""vae_fast.gaussian_kl against torch.distributions.kl_divergence(Normal, Normal)."""

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
    RTOL,
    SHAPES,
    check_against_truth,
    leaf,
    make,
    resolve_event_dims,
    truth_kl,
)

import vae_fast

op = vae_fast.gaussian_kl


def inputs(
    shape,
    dtype,
    device,
    gen,
    *,
    prior_mu_shape=None,
    prior_logvar_shape=None,
    layouts=("contiguous",) * 4,
    grad=(True, True, True, True),
):
    """mu, logvar of `shape`; a prior of the given shapes (None: no such prior argument)."""
    mu = make(shape, dtype, device, layouts[0], kind="normal", high=1.5, gen=gen)
    logvar = make(shape, dtype, device, layouts[1], low=-3.0, high=2.0, gen=gen)
    pm = plv = None
    if prior_mu_shape is not None:
        pm = make(
            prior_mu_shape,
            dtype,
            device,
            layouts[2] if prior_mu_shape else "contiguous",
            kind="normal",
            gen=gen,
        )
    if prior_logvar_shape is not None:
        plv = make(
            prior_logvar_shape,
            dtype,
            device,
            layouts[3] if prior_logvar_shape else "contiguous",
            low=-2.0,
            high=2.0,
            gen=gen,
        )
    return {
        "mu": leaf(mu, grad[0]),
        "logvar": leaf(logvar, grad[1]),
        "prior_mu": None if pm is None else leaf(pm, grad[2]),
        "prior_logvar": None if plv is None else leaf(plv, grad[3]),
    }


# dtype x shape on the value path (event_dims=None); event_dims on the 3-d shape.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, shape, event_dims",
    [(dt, shape, None) for dt in FLOAT_DTYPES for shape in SHAPES]
    + [(dt, (3, 5, 17), k) for dt in EXACT_DTYPES for k in EVENT_DIMS if k is not None],
)
def test_standard_prior(device, dtype, shape, event_dims, gen):
    k = resolve_event_dims(event_dims, len(shape))
    out = check_against_truth(
        op, truth_kl, inputs(shape, dtype, device, gen), dtype, gen=gen, kwargs={"event_dims": k}
    )
    kk = len(shape) - 1 if k is None else k
    assert out.shape == shape[: len(shape) - kk]


# Prior shapes: None means the argument is not given (that part of N(0, 1) is used).
PRIORS = [
    ((6, 10), (6, 10), (6, 10)),  # a full (per-sample) prior, e.g. a learned conditional prior
    ((6, 10), (10,), (10,)),  # a per-feature prior (a learned N(m, s^2) over latents)
    ((6, 10), (1, 10), (1, 10)),  # per feature with the batch dim kept as 1
    ((6, 10), (), ()),  # 0-d scalars
    ((6, 10), (10,), None),  # only prior_mu: unit prior variance
    ((6, 10), None, (10,)),  # only prior_logvar: zero prior mean
    ((6, 10), (6, 1), (10,)),  # different broadcasts for the two
    ((3, 5, 7), (5, 7), (1, 5, 1)),  # 3-d, per-feature and a two-place broadcast
    ((257, 33), (33,), (33,)),  # many rows summed into a per-feature gradient
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape, pm_shape, plv_shape", PRIORS)
def test_with_prior(device, dtype, shape, pm_shape, plv_shape, gen):
    ins = inputs(shape, dtype, device, gen, prior_mu_shape=pm_shape, prior_logvar_shape=plv_shape)
    check_against_truth(op, truth_kl, ins, dtype, gen=gen)
    check_against_truth(op, truth_kl, ins, dtype, gen=gen, kwargs={"event_dims": 1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "layouts",
    [
        ("transposed", "transposed", "transposed", "transposed"),
        ("strided", "contiguous", "strided", "contiguous"),
        ("expanded", "strided", "contiguous", "expanded"),
        ("contiguous", "expanded", "transposed", "strided"),
    ],
)
def test_layouts(device, dtype, layouts, gen):
    ins = inputs(
        (7, 13),
        dtype,
        device,
        gen,
        prior_mu_shape=(7, 13),
        prior_logvar_shape=(7, 13),
        layouts=layouts,
    )
    check_against_truth(op, truth_kl, ins, dtype, gen=gen)
    ins = inputs((7, 13), dtype, device, gen, layouts=layouts)  # and with the standard prior
    check_against_truth(op, truth_kl, ins, dtype, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "grad",
    [
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
        (False, True, False, True),
    ],
    ids=["mu", "logvar", "prior_mu", "prior_logvar", "logvar+prior_logvar"],
)
def test_grad_subsets(device, dtype, grad, gen):
    ins = inputs(
        (5, 11), dtype, device, gen, prior_mu_shape=(11,), prior_logvar_shape=(5, 11), grad=grad
    )
    check_against_truth(op, truth_kl, ins, dtype, gen=gen)
    op(**ins).sum().backward()
    for name, g in zip(("mu", "logvar", "prior_mu", "prior_logvar"), grad):
        assert (ins[name].grad is not None) == g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_zero_when_equal(device, dtype, gen):
    # KL(p || p) is exactly 0 (expm1(0) - 0 + 0), with exactly zero gradients.
    mu = leaf(make((4, 9), dtype, device, kind="normal", gen=gen))
    logvar = leaf(make((4, 9), dtype, device, gen=gen))
    pm, plv = leaf(mu.detach().clone()), leaf(logvar.detach().clone())
    out = op(mu, logvar, pm, plv)
    assert torch.equal(out, torch.zeros(4, dtype=dtype, device=device))
    for g in torch.autograd.grad(out.sum(), [mu, logvar, pm, plv]):
        assert torch.equal(g, torch.zeros_like(g))


def _standard_kl_of_logvar(d: torch.Tensor) -> torch.Tensor:
    """KL(N(0, e^d) || N(0, 1)) = (expm1(d) - d) / 2 in float64, without cancellation."""
    d = d.double()
    series = sum(d**k / math.factorial(k) for k in range(2, 10))  # exact below 1e-2
    return 0.5 * torch.where(d.abs() < 1e-2, series, torch.expm1(d) - d)


def _check_per_element_kl(d: torch.Tensor, device: str) -> None:
    """gaussian_kl(0, d) of one-element rows against float64, to the dtype's rtol."""
    zeros = torch.zeros(d.numel(), 1, dtype=d.dtype, device=device)
    got = op(zeros, d.to(device).view(-1, 1))
    want = _standard_kl_of_logvar(d)
    torch.testing.assert_close(got.cpu().double(), want, rtol=RTOL[d.dtype], atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("backend", ["fused", "reference"])  # the reference's series too
def test_close_variances_keep_relative_precision(device, dtype, backend):
    # Per dim, KL = (expm1(d) - d)/2, about d^2/4, for d = logvar - prior_logvar.
    # Computed as expm1(d) - d in two steps it cancels (relative error ~ulp(1)/d:
    # 100% at d = 1e-7 in float32, 1e-7 at d = 1e-9 in float64); the kernels form it in
    # one piece, the reference by its series.
    d = [1e-9, 1e-7, -3e-6, 2e-5, 1e-4, -1e-3, 0.02, -0.2, 0.4, -0.6]
    with vae_fast.backend(backend):
        _check_per_element_kl(torch.tensor(d, dtype=dtype), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("create_graph", [False, True])  # the recorded backward's route
def test_overflowing_variance_gives_an_infinite_gradient(device, dtype, backend, create_graph):
    # Where exp(logvar) overflows (but logvar is finite) the KL and d/dlogvar are +inf,
    # as in plain torch; not nan from a masked-off exp's 0 * inf.
    big = 89.0 if dtype == torch.float32 else 710.0
    logvar = torch.tensor([[big, 0.5]], dtype=dtype, device=device, requires_grad=True)
    with vae_fast.backend(backend):
        kl = vae_fast.gaussian_kl(torch.zeros_like(logvar), logvar, event_dims=0)
    (g,) = torch.autograd.grad(kl.sum(), logvar, create_graph=create_graph)
    assert kl[0, 0] == math.inf and g[0, 0] == math.inf, (kl, g)
    assert torch.isclose(g[0, 1], torch.expm1(logvar[0, 1].detach()) / 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_variance_term_over_the_exp_range(device, dtype):
    # Every logvar from -87 to 88 (float32's whole exp range, through the fast exp's
    # reduction boundaries at odd multiples of ln(2)/2), against float64 per element.
    _check_per_element_kl(torch.linspace(-87.0, 88.0, 70001, dtype=torch.float64).to(dtype), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_nonnegative(device, dtype, gen):
    ins = inputs((64, 40), dtype, device, gen, prior_mu_shape=(40,), prior_logvar_shape=(40,))
    assert (op(**ins, event_dims=0) >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_prior", [False, True])
def test_empty(device, dtype, with_prior, gen):
    p = (5,) if with_prior else None
    ins = inputs((0, 5), dtype, device, gen, prior_mu_shape=p, prior_logvar_shape=p)
    out = op(**ins)
    assert out.shape == (0,) and out.dtype == dtype
    leaves = [t for t in ins.values() if t is not None]
    for g, t in zip(torch.autograd.grad(out, leaves, torch.ones_like(out)), leaves):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "logvar_value, prior_logvar_value",
    [
        (80.0, None),
        (-80.0, None),  # huge / tiny posterior variance, standard prior
        (0.0, 80.0),
        (0.0, -80.0),  # a huge / tiny prior variance
        (-80.0, -80.0),  # both tiny: only the difference matters
    ],
)
def test_extreme_logvar(device, dtype, logvar_value, prior_logvar_value, gen):
    shape = (3, 8)
    mu = make(shape, dtype, device, kind="normal", high=1e-3, gen=gen)
    jitter = make(shape, dtype, device, low=-0.5, high=0.5, gen=gen)
    logvar = torch.full(shape, logvar_value, dtype=dtype, device=device) + jitter
    plv = None
    pm = None
    if prior_logvar_value is not None:
        plv = torch.full((8,), prior_logvar_value, dtype=dtype, device=device)
        plv = plv + make((8,), dtype, device, low=-0.5, high=0.5, gen=gen)
        pm = make((8,), dtype, device, kind="normal", high=1e-3, gen=gen)
        # the means must be within the prior's scale for the KL to be finite in fp32
        pm = pm * torch.exp(0.5 * plv).detach().clamp(max=1.0)
        mu = mu * torch.exp(0.5 * plv).detach().clamp(max=1.0)
    ins = {
        "mu": leaf(mu),
        "logvar": leaf(logvar),
        "prior_mu": None if pm is None else leaf(pm),
        "prior_logvar": None if plv is None else leaf(plv),
    }
    out = check_against_truth(op, truth_kl, ins, dtype, gen=gen)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_infinite_log_variances(device, dtype):
    # A zero or infinite variance (logvar or prior_logvar of -inf or +inf): the KL is +inf
    # and the gradients are the limits (d/dlogvar = (e^d - 1)/2 = -1/2 at d = -inf, not
    # inf - inf), the same on every CPU capability and in the reference.
    inf = math.inf
    values = {
        "mu": [[0.5, 0.5, 0.5, 0.5]],
        "logvar": [[-inf, inf, 0.0, 1.0]],
        "prior_logvar": [[0.0, 0.0, inf, -inf]],
    }
    results = []
    for backend in ("fused", "reference"):
        leaves = {k: torch.tensor(v, dtype=dtype, device=device, requires_grad=True)
                  for k, v in values.items()}  # fmt: skip
        with vae_fast.backend(backend):
            kl = vae_fast.gaussian_kl(leaves["mu"], leaves["logvar"], None,
                                      leaves["prior_logvar"], event_dims=0)  # fmt: skip
        kl.sum().backward()
        results.append([kl.detach(), *(t.grad for t in leaves.values())])
    (kl, *grads), want = results
    assert kl.isposinf().all()
    for got, expected in zip([kl, *grads], want):
        assert torch.equal(got, expected), (got, expected)
    assert grads[1][0, 0] == -0.5 and grads[1][0, 1] == inf


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device, gen):
    ins = inputs((4, 9), torch.float64, device, gen, prior_mu_shape=(9,), prior_logvar_shape=())
    with torch.no_grad():
        out = op(**ins)
    assert out.grad_fn is None and not out.requires_grad
    want = truth_kl(*(t.detach() for t in ins.values()))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- bad input


def test_mismatched_shapes():
    with pytest.raises(
        ValueError, match=r"`logvar` has shape \(3, 5\) but `mu` has shape \(3, 4\)"
    ):
        op(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("name", ["prior_mu", "prior_logvar"])
def test_prior_not_broadcastable(name):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"`{name}` has shape (3,), which does not broadcast to `mu`'s shape (3, 4)"
        ),
    ):
        op(torch.randn(3, 4), torch.randn(3, 4), **{name: torch.zeros(3)})


@pytest.mark.parametrize("name", ["mu", "logvar", "prior_mu", "prior_logvar"])
def test_integer_dtype(name):
    args = {"mu": torch.randn(3, 4), "logvar": torch.randn(3, 4)}
    args[name] = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match=rf"`{name}` has dtype torch.int64; expected a floating"):
        op(**args)


def test_mixed_dtypes():
    with pytest.raises(
        TypeError, match=r"`prior_logvar` has dtype torch.float64 but `mu` has torch.float32"
    ):
        op(torch.randn(3, 4), torch.randn(3, 4), None, torch.zeros(4, dtype=torch.float64))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"`prior_mu` is on cuda:0 but `mu` is on cpu"):
        op(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(4, device="cuda"))


def test_event_dims_out_of_range():
    with pytest.raises(ValueError, match=r"`event_dims`=-2 is out of range for an input with 2"):
        op(torch.randn(3, 4), torch.randn(3, 4), event_dims=-2)
