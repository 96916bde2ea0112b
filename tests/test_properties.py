"""Property tests: random shapes, event_dims, broadcasts, memory layouts and values,
the public ops against vae_fast.reference (itself checked against torch.distributions
in the per-op tests), values and gradients.

Runs are reproducible by default (the "ci" profile: derandomized, no example database);
``HYPOTHESIS_PROFILE=explore`` searches far more cases with fresh randomness.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import RTOL, assert_close_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vae_fast
from vae_fast import reference

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = st.sampled_from([torch.float64, torch.float32])
# Sizes: mostly small and odd, sometimes a vector width or more, rarely empty.
SIZES = st.sampled_from([1, 1, 2, 3, 5, 7, 8, 9, 16, 17, 33, 0])


@st.composite
def shapes(draw, min_dims=1, max_dims=4, budget=2048):
    """Up to max_dims sizes whose product stays within `budget` elements (keeps runs fast)."""
    n = draw(st.integers(min_dims, max_dims))
    out, total = [], 1
    for _ in range(n):
        size = draw(SIZES)
        if total * size > budget:
            size = 1
        total *= max(size, 1)
        out.append(size)
    return tuple(out)


@st.composite
def broadcast_of(draw, shape):
    """A shape that broadcasts to `shape` without growing it: trailing dims, some set to 1."""
    k = draw(st.integers(0, len(shape)))
    return tuple(1 if draw(st.booleans()) else s for s in shape[len(shape) - k :])


@st.composite
def layouts(draw, ndim):
    """A random memory layout: a dim permutation, a step per dim, dims broadcast (stride 0)."""
    return {
        "perm": draw(st.permutations(range(ndim))),
        "steps": [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(ndim)],
        "expand": [draw(st.integers(0, 5)) == 0 for _ in range(ndim)],
    }


def _reduced(shape, layout):
    """The shape actually stored: 1 along the dims that are broadcast (those of size > 1)."""
    return [1 if e and s > 1 else s for s, e in zip(shape, layout["expand"])]


def build(values: torch.Tensor, layout) -> torch.Tensor:
    """`values` (already constant along the dims to expand) laid out as `layout` says."""
    if values.dim() == 0:
        return values.clone()
    shape = values.shape
    reduced = _reduced(shape, layout)
    perm, steps = layout["perm"], layout["steps"]
    base = torch.full(
        [max(reduced[p] * steps[p], 1) for p in perm], float("nan"), dtype=values.dtype
    )
    view = base[tuple(slice(0, reduced[p] * steps[p], steps[p]) for p in perm)]
    inverse = sorted(range(len(perm)), key=lambda i: perm[i])
    view = view.permute(*inverse)
    assert tuple(view.shape) == tuple(reduced)
    view.copy_(values[tuple(slice(0, r) for r in reduced)])
    return view.expand(shape)


def tensor(draw, shape, dtype, low, high, *, grad=True):
    """Random values in [low, high) with a random layout; constant along expanded dims."""
    layout = draw(layouts(len(shape)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    reduced = _reduced(shape, layout)
    v = torch.rand(reduced, dtype=torch.float64, generator=g) * (high - low) + low
    t = build(v.expand(shape).to(dtype), layout)
    return t.detach().requires_grad_(grad)


def compare(out, ref_fn, inputs, dtype, seed):
    """Values and gradients (for a random grad_output) of `out` against `ref_fn` run on
    fp64 copies of the inputs."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    ref_inputs = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs
    ]
    want = ref_fn(*ref_inputs)
    rtol = RTOL[dtype]
    assert out.dtype == dtype
    assert_close_exact(out, want, rtol, what="value")
    if not leaves or not out.requires_grad:
        return
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=g)
    # allow_unused: an empty input's gradient may come back as None (known bug
    # "empty-1d-grad", checked by the test_empty tests); numerically there is nothing to lose
    got = torch.autograd.grad(out, leaves, grad_out.to(dtype), allow_unused=True)
    ref_leaves = [r for r in ref_inputs if r is not None and r.requires_grad]
    wants = torch.autograd.grad(want, ref_leaves, grad_out, allow_unused=True)
    for i, (a, w) in enumerate(zip(got, wants)):
        if a is None:
            assert leaves[i].numel() == 0, f"no gradient for input {i}"
            continue
        assert a.shape == leaves[i].shape
        assert_close_exact(a, torch.zeros_like(a) if w is None else w, rtol, what=f"grad {i}")


def _event_dims(draw, ndim):
    return draw(st.none() | st.integers(0, ndim))


@given(data=st.data())
def test_bernoulli_property(data):
    draw = data.draw
    dtype, shape = draw(DTYPES), draw(shapes(min_dims=0))
    k = _event_dims(draw, len(shape))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 100.0, 1e4]))
    x = tensor(draw, shape, dtype, 0.0, 1.0, grad=draw(st.booleans()))
    logits = tensor(draw, shape, dtype, -scale, scale)
    out = vae_fast.bernoulli_log_prob(x, logits, event_dims=k)
    compare(
        out,
        lambda a, b: reference.bernoulli_log_prob(a, b, event_dims=k),
        [x, logits],
        dtype,
        draw(st.integers(0, 2**31)),
    )


@given(data=st.data())
def test_gaussian_property(data):
    draw = data.draw
    dtype, shape = draw(DTYPES), draw(shapes(min_dims=0))
    k = _event_dims(draw, len(shape))
    lv_shape = draw(broadcast_of(shape))
    x = tensor(draw, shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
    mean = tensor(draw, shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
    logvar = tensor(draw, lv_shape, dtype, -8.0, 8.0)
    out = vae_fast.gaussian_log_prob(x, mean, logvar, event_dims=k)
    compare(
        out,
        lambda a, b, c: reference.gaussian_log_prob(a, b, c, event_dims=k),
        [x, mean, logvar],
        dtype,
        draw(st.integers(0, 2**31)),
    )


@given(data=st.data())
def test_kl_property(data):
    draw = data.draw
    dtype, shape = draw(DTYPES), draw(shapes(min_dims=0))
    k = _event_dims(draw, len(shape))
    mu = tensor(draw, shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
    logvar = tensor(draw, shape, dtype, -6.0, 6.0)
    pm = plv = None
    if draw(st.booleans()):
        pm = tensor(draw, draw(broadcast_of(shape)), dtype, -2.0, 2.0, grad=draw(st.booleans()))
    if draw(st.booleans()):
        plv = tensor(draw, draw(broadcast_of(shape)), dtype, -4.0, 4.0, grad=draw(st.booleans()))
    out = vae_fast.gaussian_kl(mu, logvar, pm, plv, event_dims=k)
    compare(
        out,
        lambda a, b, c, d: reference.gaussian_kl(a, b, c, d, event_dims=k),
        [mu, logvar, pm, plv],
        dtype,
        draw(st.integers(0, 2**31)),
    )


@given(data=st.data())
def test_reparameterize_property(data):
    # eps depends only on the generator's state, the shape and the dtype: the op's own
    # eps, drawn again from the same seed on zeros, gives z and both gradients.
    draw = data.draw
    dtype, shape = draw(DTYPES), draw(shapes(min_dims=0, max_dims=3))
    num_samples = draw(st.none() | st.integers(1, 3))
    mu = tensor(draw, shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
    logvar = tensor(draw, shape, dtype, -6.0, 6.0)
    seed = draw(st.integers(0, 2**31))
    out = vae_fast.reparameterize(
        mu, logvar, num_samples=num_samples, generator=torch.Generator().manual_seed(seed)
    )
    zeros = torch.zeros(mu.shape, dtype=dtype)
    _, eps = torch.ops.vae_fast.reparameterize(
        zeros, zeros, num_samples, generator=torch.Generator().manual_seed(seed)
    )

    def ref(a, b):
        return a + torch.exp(0.5 * b) * eps.double()

    compare(out, ref, [mu, logvar], dtype, seed)


@given(data=st.data())
def test_elbo_property(data):
    draw = data.draw
    dtype = draw(DTYPES)
    batch = draw(SIZES)
    x_shape = (batch, *draw(shapes(min_dims=0, max_dims=3, budget=256)))
    z_shape = (batch, *draw(shapes(min_dims=0, max_dims=2, budget=64)))
    likelihood = draw(st.sampled_from(["bernoulli", "gaussian"]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    beta = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    if likelihood == "bernoulli":
        x = tensor(draw, x_shape, dtype, 0.0, 1.0, grad=False)
        recon = tensor(draw, x_shape, dtype, -20.0, 20.0, grad=draw(st.booleans()))
        obs = None
    else:
        x = tensor(draw, x_shape, dtype, -3.0, 3.0, grad=draw(st.integers(0, 4)) == 0)
        recon = tensor(draw, x_shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
        obs = None
        if draw(st.booleans()):
            obs = tensor(
                draw, draw(broadcast_of(x_shape)), dtype, -3.0, 3.0, grad=draw(st.booleans())
            )
    mu = tensor(draw, z_shape, dtype, -3.0, 3.0, grad=draw(st.booleans()))
    logvar = tensor(draw, z_shape, dtype, -5.0, 5.0, grad=draw(st.booleans()))
    # which outputs the gradient flows from: the loss (saved-gradient route), or also
    # the returned log-likelihood / KL (the general route)
    use = draw(st.sampled_from([(0,), (0,), (0, 1), (2,), (0, 1, 2)]))
    kw = {"likelihood": likelihood, "beta": beta, "reduction": reduction}
    outs = vae_fast.elbo(recon, x, mu, logvar, obs_logvar=obs, **kw)
    ins = [recon, x, mu, logvar, obs]  # the public order, for reference.elbo below

    def combined(ts, fn):
        loss, ll, kl = fn(*ts[:4], obs_logvar=ts[4], **kw)
        parts = (loss, ll, kl)
        return parts, sum(parts[i].sum() * (i + 1) for i in use)

    ref_ins = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ins
    ]
    (want_parts, want_total) = combined(ref_ins, reference.elbo)
    rtol = RTOL[dtype]
    for name, o, w in zip(("loss", "ll", "kl"), outs, want_parts):
        assert o.dtype == dtype and o.shape == w.shape
        assert_close_exact(o, w, rtol, what=name)
    leaves = [t for t in ins if t is not None and t.requires_grad]
    if not leaves:
        assert all(o.grad_fn is None for o in outs)
        return
    total = sum(outs[i].sum() * (i + 1) for i in use)
    ref_leaves = [r for r in ref_ins if r is not None and r.requires_grad]

    def grads(out, wrt):  # None where an input does not reach the picked outputs at all
        if not out.requires_grad:
            return [None] * len(wrt)
        return torch.autograd.grad(out, wrt, allow_unused=True)

    got, wants = grads(total, leaves), grads(want_total, ref_leaves)
    for i, (a, w) in enumerate(zip(got, wants)):
        if w is None:
            assert a is None or not a.any()
            continue
        if a is None:  # see compare(): only an empty input may lack its gradient
            assert leaves[i].numel() == 0, f"no gradient for input {i}"
            continue
        assert a.shape == leaves[i].shape
        assert_close_exact(a, w, rtol, what=f"grad {i}")


@pytest.mark.parametrize("layout_seed", range(3))
def test_build_helper(layout_seed):
    # The layout builder itself: same values, the strides it promises.
    g = torch.Generator().manual_seed(layout_seed)
    v = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    lay = {"perm": [2, 0, 1], "steps": [2, 1, 3], "expand": [False, False, False]}
    t = build(v, lay)
    assert torch.equal(t, v) and not t.is_contiguous()
    lay["expand"] = [True, False, False]
    t = build(v[:1].expand(3, 4, 5), lay)
    assert t.stride(0) == 0 and torch.equal(t, v[:1].expand(3, 4, 5))


# Row lengths around every vector width (4 and 8 doubles, 8 and 16 floats, 16 and 32
# halves): the vector body, its remainder and the scalar tail all get exercised.
ROW_LENGTHS = [*range(1, 35), 47, 48, 49, 63, 64, 65, 95, 96, 97, 127, 128, 129]
SWEEP_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _sweep_inputs(op_name, D, dtype, layout, g):
    def t(low, high, shape=(3, D)):
        v = torch.rand(shape, dtype=torch.float64, generator=g) * (high - low) + low
        if layout == "transposed" and len(shape) == 2:
            v = v.t().contiguous().t()
        return v.to(dtype).requires_grad_(True)

    if op_name == "bernoulli_log_prob":
        return [t(0.0, 1.0), t(-8.0, 8.0)]
    if op_name == "gaussian_log_prob":
        return [t(-2.0, 2.0), t(-2.0, 2.0), t(-2.0, 2.0, (D,))]
    if op_name == "gaussian_kl":
        return [t(-2.0, 2.0), t(-3.0, 2.0), t(-1.0, 1.0, (D,)), t(-1.0, 1.0)]
    x, recon = t(0.0, 1.0), t(-8.0, 8.0)  # elbo's public order: recon, then x
    return [recon, x.detach(), t(-2.0, 2.0, (3, D // 2 + 1)), t(-3.0, 2.0, (3, D // 2 + 1))]


def _close_to_reference(got, want, dtype, what):
    if dtype in (torch.float64, torch.float32):
        assert_close_exact(got, want, RTOL[dtype] if dtype == torch.float64 else 1e-5, what)
    else:  # both accumulate in float32 and round once: at most an ulp or so apart
        eps = torch.finfo(dtype).eps
        scale = float(want.detach().abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(
            got.double(),
            want.double(),
            rtol=2 * eps,
            atol=eps * scale,
            msg=lambda m: f"{what}: {m}",
        )


@pytest.mark.parametrize("dtype", SWEEP_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize(
    "op_name", ["bernoulli_log_prob", "gaussian_log_prob", "gaussian_kl", "elbo"]
)
def test_row_length_sweep(op_name, layout, dtype):
    g = torch.Generator().manual_seed(11)
    fused, ref = getattr(vae_fast, op_name), getattr(reference, op_name)
    for D in ROW_LENGTHS:
        args = _sweep_inputs(op_name, D, dtype, layout, g)
        leaves = [a for a in args if a.requires_grad]
        outs = fused(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        refs = ref(*args)
        refs = refs if isinstance(refs, tuple) else (refs,)
        for o, r in zip(outs, refs):
            _close_to_reference(o, r, dtype, f"{op_name} D={D} value")
        got = torch.autograd.grad(outs[0].sum(), leaves)
        want = torch.autograd.grad(refs[0].sum(), leaves)
        for i, (a, w) in enumerate(zip(got, want)):
            _close_to_reference(a, w, dtype, f"{op_name} D={D} grad {i}")
