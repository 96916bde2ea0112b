"""The compiled operators as torch operators.

- ``torch.library.opcheck`` on every operator, the private ``_*_backward`` ops included
  (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes).
- fp64 ``torch.autograd.gradcheck`` through the public functions (their registered
  autograd). The ``_*_backward`` ops have no derivative of their own, so instead of a
  gradcheck they are compared with the vector-Jacobian products of vae_fast.reference,
  every ``output_mask`` pattern included.
- The C++ input checks (direct torch.ops calls that bypass the Python ones), double
  backward (must work or raise), autocast, and torch.compile: a fullgraph training step
  through reparameterize and elbo, and symbolic batch sizes through all five ops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, make

import vae_fast
from vae_fast import reference

# elbo's beta as the op takes it: a 0-d tensor (the public function converts numbers).
_BETA = torch.tensor(0.5, dtype=torch.float64)
_ONE = torch.tensor(1.0, dtype=torch.float64)

pytestmark = pytest.mark.fused_only
try:  # the operators exist once vae_fast._C is loaded
    ops = torch.ops.vae_fast
    ops.elbo  # noqa: B018
except (AttributeError, RuntimeError):
    ops = None


def test_extension_is_built():
    assert ops is not None, "vae_fast._C is not loaded: torch.ops.vae_fast has no operators"


def _t(shape, device, *, low=-2.0, high=2.0, grad=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    t = make(shape, dtype, device, low=low, high=high, gen=g)
    return t.requires_grad_(grad)


def _x01(shape, device, **kw):
    return _t(shape, device, low=0.0, high=1.0, **kw)


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    """(op, args, kwargs, id) for every operator, the backward ops with every output_mask
    pattern that matters. Inputs of the public ops require grad (so that the autograd
    registration is checked too); those of the backward ops do not (they have none)."""
    cases = []
    for dt in (torch.float64, torch.float32):
        cases += _full_cases(device, dt)
    # half types: the kernels' accumulate-in-float32 paths
    for dt in (torch.bfloat16, torch.float16):
        cases += _half_cases(device, dt)
    return cases + _transposed_cases(device)


def _transposed_cases(device):
    """Transposed inputs: the kernels return contiguous gradients whatever the inputs'
    strides, and the fake kernels must say so (torch.compile checks the strides)."""
    X, T, _ = _makers(device, torch.float32)

    def TT(shape, x01=False, **kw):  # a (rows, cols) tensor stored column-major
        return (X if x01 else T)(shape[::-1], **kw).t()

    return [
        ("_bernoulli_log_prob_backward", (T((4,)), TT((4, 7), True), TT((4, 7)), 1, [True, True]),
         {}, "transposed-bern-bwd"),
        ("_gaussian_log_prob_backward",
         (T((4,)), TT((4, 7)), TT((4, 7)), TT((4, 7)), 1, [True, True, True]),
         {}, "transposed-gauss-bwd"),
        ("_gaussian_kl_backward",
         (T((4,)), TT((4, 3)), TT((4, 3)), TT((4, 3)), TT((4, 3)), 1, [True] * 4),
         {}, "transposed-kl-bwd"),
        ("_reparameterize_backward", (TT((4, 3)), TT((4, 3)), TT((4, 3)), [True, True]),
         {}, "transposed-reparam-bwd"),
        ("elbo",
         (TT((4, 7)), TT((4, 7), grad=True), TT((4, 3), grad=True), TT((4, 3), grad=True),
          TT((4, 7), grad=True), "gaussian", _BETA, "mean", True),
         {}, "transposed-elbo"),
    ]  # fmt: skip


def _makers(device, dt):
    def X(shape, **kw):  # targets in [0, 1]
        return _x01(shape, device, dtype=dt, **kw)

    def T(shape, **kw):
        return None if shape is None else _t(shape, device, dtype=dt, **kw)

    return X, T, str(dt).split(".")[-1]


def _full_cases(device, dt):
    X, T, n = _makers(device, dt)
    cases = [
        ("bernoulli_log_prob", (X((4, 7)), T((4, 7), grad=True), 1), {}, f"bern-{n}"),
        (
            "bernoulli_log_prob",
            (X((2, 3, 5), grad=True), T((2, 3, 5), grad=True), 2),
            {},
            f"bern-3d-{n}",
        ),
        ("bernoulli_log_prob", (X((4, 7)), T((4, 7), grad=True), 0), {}, f"bern-ev0-{n}"),
    ]
    for mask in ([True, True], [False, True], [True, False]):
        cases.append(
            (
                "_bernoulli_log_prob_backward",
                (T((4,)), X((4, 7)), T((4, 7)), 1, mask),
                {},
                f"bern-bwd-{mask}-{n}",
            )
        )
    for lv in ((), (7,), (4, 7)):
        cases.append(
            (
                "gaussian_log_prob",
                (T((4, 7), grad=True), T((4, 7), grad=True), T(lv, grad=True), 1),
                {},
                f"gauss-lv{lv}-{n}",
            )
        )
        for mask in ([True, True, True], [False, True, False], [False, False, True]):
            cases.append(
                (
                    "_gaussian_log_prob_backward",
                    (T((4,)), T((4, 7)), T((4, 7)), T(lv), 1, mask),
                    {},
                    f"gauss-bwd-lv{lv}-{mask}-{n}",
                )
            )
    for pm, plv in ((None, None), ((7,), (7,)), ((4, 7), None), (None, ())):
        cases.append(
            (
                "gaussian_kl",
                (
                    T((4, 7), grad=True),
                    T((4, 7), grad=True),
                    T(pm, grad=True),
                    T(plv, grad=True),
                    1,
                ),
                {},
                f"kl-{pm}-{plv}-{n}",
            )
        )
        for mask in (
            [True, True, True, True],
            [True, False, False, False],
            [False, False, pm is not None, plv is not None],
        ):
            cases.append(
                (
                    "_gaussian_kl_backward",
                    (T((4,)), T((4, 7)), T((4, 7)), T(pm), T(plv), 1, mask),
                    {},
                    f"kl-bwd-{pm}-{plv}-{mask}-{n}",
                )
            )
    # reparameterize is a seeded op: opcheck re-seeds before each run it compares
    for k in (None, 3):
        cases.append(
            (
                "reparameterize",
                (T((4, 7), grad=True), T((4, 7), grad=True), k),
                {},
                f"reparam-K{k}-{n}",
            )
        )
        eps_shape = (4, 7) if k is None else (k, 4, 7)
        for mask in ([True, True], [False, True]):
            cases.append(
                (
                    "_reparameterize_backward",
                    (T(eps_shape), T((4, 7)), T(eps_shape), mask),
                    {},
                    f"reparam-bwd-K{k}-{mask}-{n}",
                )
            )
    for lik, obs in (
        ("bernoulli", None),
        ("gaussian", None),
        ("gaussian", ()),
        ("gaussian", (7,)),
        ("gaussian", (4, 7)),
    ):
        # every reduction with the gradients computed, and one call without them
        for red, cg in (("mean", True), ("sum", True), ("none", True), ("mean", False)):
            x = X((4, 7)) if lik == "bernoulli" else T((4, 7))
            args = (
                x,
                T((4, 7), grad=cg),
                T((4, 3), grad=cg),
                T((4, 3), grad=cg),
                T(obs, grad=cg),
                lik,
                _BETA,
                red,
                cg,
            )
            cases.append(("elbo", args, {}, f"elbo-{lik}-{obs}-{red}-grad{cg}-{n}"))
        # elbo(inplace_grad=True): the gradient written over recon (a mutated input)
        x = X((4, 7)) if lik == "bernoulli" else T((4, 7))
        args = (x, T((4, 7)), T((4, 3)), T((4, 3)), T(obs), lik, _BETA, "sum")
        cases.append(("_elbo_into_recon", args, {}, f"elbo_into_recon-{lik}-{obs}-{n}"))
    return cases


def _half_cases(device, dt):
    X, T, n = _makers(device, dt)
    return [
        ("bernoulli_log_prob", (X((4, 7)), T((4, 7), grad=True), 1), {}, f"bern-{n}"),
        (
            "gaussian_log_prob",
            (T((4, 7)), T((4, 7), grad=True), T((7,), grad=True), 1),
            {},
            f"gauss-{n}",
        ),
        (
            "gaussian_kl",
            (T((4, 7), grad=True), T((4, 7), grad=True), None, None, 1),
            {},
            f"kl-{n}",
        ),
        ("reparameterize", (T((4, 7), grad=True), T((4, 7), grad=True), 2), {}, f"reparam-{n}"),
        (
            "elbo",
            (
                X((4, 7)),
                T((4, 7), grad=True),
                T((4, 3), grad=True),
                T((4, 3), grad=True),
                None,
                "bernoulli",
                _ONE,
                "mean",
                True,
            ),
            {},
            f"elbo-{n}",
        ),
    ]


def _case_ids(device):
    # Built from the op names, so the ids are the same whether vae_fast._C is built or not.
    return [c[3] for c in _opcheck_cases(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_case_ids("cpu"))), ids=_case_ids("cpu"))
def test_opcheck(device, case):
    name, args, kwargs, _ = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.vae_fast, name), args, kwargs)


# --------------------------------------------------------------------------- gradcheck


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("event_dims", [None, 0, 1, 2])
def test_gradcheck_bernoulli(device, event_dims):
    x, logits = _x01((3, 2, 4), device, grad=True), _t((3, 2, 4), device, grad=True)
    _gradcheck(lambda a, b: vae_fast.bernoulli_log_prob(a, b, event_dims=event_dims), x, logits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logvar_shape", [(), (4,), (1, 4), (3, 1), (3, 4)])
def test_gradcheck_gaussian(device, logvar_shape):
    x, mean = _t((3, 4), device, grad=True), _t((3, 4), device, grad=True, seed=1)
    logvar = _t(logvar_shape, device, low=-1.0, high=1.0, grad=True)
    _gradcheck(lambda a, b, c: vae_fast.gaussian_log_prob(a, b, c), x, mean, logvar)
    _gradcheck(lambda a, b, c: vae_fast.gaussian_log_prob(a, b, c, event_dims=0), x, mean, logvar)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "prior_shapes", [(None, None), ((4,), (4,)), ((3, 4), (3, 4)), ((), None), (None, (1, 4))]
)
def test_gradcheck_kl(device, prior_shapes):
    mu, logvar = _t((3, 4), device, grad=True), _t((3, 4), device, low=-1.0, high=1.0, grad=True)
    pm, plv = (
        None if s is None else _t(s, device, low=-1.0, high=1.0, grad=True, seed=i)
        for i, s in enumerate(prior_shapes)
    )
    inputs = [t for t in (mu, logvar, pm, plv) if t is not None]

    def fn(*ts):
        it = iter(ts)
        a, b = next(it), next(it)
        c = next(it) if pm is not None else None
        d = next(it) if plv is not None else None
        return vae_fast.gaussian_kl(a, b, c, d)

    _gradcheck(fn, *inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_samples", [None, 2])
def test_gradcheck_reparameterize(device, num_samples):
    # A freshly seeded generator per call makes the function deterministic for gradcheck.
    mu, logvar = _t((3, 4), device, grad=True), _t((3, 4), device, low=-1.0, high=1.0, grad=True)

    def fn(a, b):
        g = torch.Generator(device).manual_seed(0)
        return vae_fast.reparameterize(a, b, num_samples=num_samples, generator=g)

    _gradcheck(fn, mu, logvar)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "likelihood, obs_shape",
    [
        ("bernoulli", None),
        ("gaussian", None),
        ("gaussian", ()),
        ("gaussian", (5,)),
        ("gaussian", (3, 5)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_elbo(device, likelihood, obs_shape, reduction):
    # All three outputs: gradcheck differentiates each on its own, so the saved-gradient
    # route (loss with grad_output 1) and the general one (ll, kl, reduction="none") both run.
    x = _x01((3, 5), device) if likelihood == "bernoulli" else _t((3, 5), device)
    recon, mu = _t((3, 5), device, grad=True, seed=1), _t((3, 2), device, grad=True, seed=2)
    logvar = _t((3, 2), device, low=-1.0, high=1.0, grad=True, seed=3)
    inputs = [recon, mu, logvar]
    if obs_shape is not None:
        inputs.append(_t(obs_shape, device, low=-1.0, high=1.0, grad=True, seed=4))

    def fn(r, m, lv, obs=None):
        return vae_fast.elbo(
            r, x, m, lv, likelihood=likelihood, obs_logvar=obs, beta=0.7, reduction=reduction
        )

    _gradcheck(fn, *inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_elbo_wrt_x(device):
    # x requiring grad (e.g. an input being optimised) takes the general backward route.
    x, recon = _t((3, 5), device, grad=True), _t((3, 5), device, grad=True, seed=1)
    mu, logvar = _t((3, 2), device, grad=True, seed=2), _t((3, 2), device, grad=True, seed=3)
    _gradcheck(
        lambda a, b, c, d: vae_fast.elbo(b, a, c, d, likelihood="gaussian"), x, recon, mu, logvar
    )
    xb = _x01((3, 5), device, grad=True)
    _gradcheck(lambda a, b, c, d: vae_fast.elbo(b, a, c, d), xb, recon, mu, logvar)


# --------------------------------------------------------------------------- backward ops


def _vjp(fn, primals, grad):
    """Gradients of <fn(*primals), grad> w.r.t. every primal (None where unused)."""
    ps = [p.detach().requires_grad_(True) if p is not None else None for p in primals]
    out = fn(*ps)
    used = [p for p in ps if p is not None]
    gs = iter(torch.autograd.grad(out, used, grad, allow_unused=True))
    return [next(gs) if p is not None else None for p in ps]


def _check_masked(got, want, mask):
    assert len(got) == len(mask)
    for g, w, m in zip(got, want, mask):
        if not m or w is None:
            # a gradient that is not asked for comes back empty, never as garbage
            assert g.numel() == 0, f"unrequested gradient has shape {tuple(g.shape)}"
            continue
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True], [False, False]])
@pytest.mark.parametrize("event_dims", [0, 1, 2])
def test_bernoulli_backward_op(device, mask, event_dims):
    x, logits = _x01((3, 4, 5), device), _t((3, 4, 5), device, seed=1)
    grad = _t((3, 4, 5)[: 3 - event_dims], device, seed=2)
    want = _vjp(
        lambda a, b: reference.bernoulli_log_prob(a, b, event_dims=event_dims), (x, logits), grad
    )
    got = ops._bernoulli_log_prob_backward(grad, x, logits, event_dims, mask)
    _check_masked(got, want, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mask", [[True, True, True], [False, True, False], [False, False, True], [True, False, False]]
)
@pytest.mark.parametrize("logvar_shape", [(), (5,), (4, 1), (3, 4, 5)])
def test_gaussian_backward_op(device, mask, logvar_shape):
    x, mean = _t((3, 4, 5), device), _t((3, 4, 5), device, seed=1)
    logvar = _t(logvar_shape, device, low=-1.0, high=1.0, seed=2)
    grad = _t((3,), device, seed=3)
    want = _vjp(lambda a, b, c: reference.gaussian_log_prob(a, b, c), (x, mean, logvar), grad)
    got = ops._gaussian_log_prob_backward(grad, x, mean, logvar, 2, mask)
    _check_masked(got, want, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mask",
    [
        [True, True, True, True],
        [False, True, False, True],
        [True, False, True, False],
        [False, False, False, False],
    ],
)
@pytest.mark.parametrize("prior_shapes", [(None, None), ((5,), (5,)), ((4, 5), None), (None, ())])
def test_kl_backward_op(device, mask, prior_shapes):
    mu, logvar = _t((4, 5), device), _t((4, 5), device, low=-1.0, high=1.0, seed=1)
    pm, plv = (
        None if s is None else _t(s, device, low=-1.0, high=1.0, seed=2 + i)
        for i, s in enumerate(prior_shapes)
    )
    grad = _t((4,), device, seed=5)
    want = _vjp(lambda a, b, c, d: reference.gaussian_kl(a, b, c, d), (mu, logvar, pm, plv), grad)
    got = ops._gaussian_kl_backward(grad, mu, logvar, pm, plv, 1, mask)
    _check_masked(got, want, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_reparameterize_backward_op(device, mask, num_samples):
    logvar = _t((4, 5), device, low=-1.0, high=1.0)
    shape = (4, 5) if num_samples is None else (num_samples, 4, 5)
    eps, grad = _t(shape, device, seed=1), _t(shape, device, seed=2)
    g = grad if num_samples is None else grad.sum(0)
    want = [g, (0.5 * grad * torch.exp(0.5 * logvar) * eps).sum_to_size(4, 5)]
    got = ops._reparameterize_backward(grad, logvar, eps, mask)
    _check_masked(got, want, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "likelihood, obs_shape", [("bernoulli", None), ("gaussian", None), ("gaussian", (6,))]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_elbo_op_saved_gradients(device, likelihood, obs_shape, reduction):
    # The gradients elbo returns with compute_grad are those of loss.sum() (grad_output 1),
    # and empty without compute_grad.
    x = _x01((4, 6), device) if likelihood == "bernoulli" else _t((4, 6), device)
    recon, mu = _t((4, 6), device, seed=1), _t((4, 3), device, seed=2)
    logvar = _t((4, 3), device, low=-1.0, high=1.0, seed=3)
    obs = None if obs_shape is None else _t(obs_shape, device, low=-1.0, high=1.0, seed=4)
    outs = ops.elbo(x, recon, mu, logvar, obs, likelihood, _BETA, reduction, True)
    loss = lambda r, m, lv, o: reference.elbo(  # noqa: E731
        r, x, m, lv, likelihood=likelihood, obs_logvar=o, beta=0.5, reduction=reduction
    )[0].sum()
    want = _vjp(loss, (recon, mu, logvar, obs), torch.ones((), dtype=x.dtype, device=device))
    for g, w in zip((outs[3], outs[5], outs[6], outs[4]), want):
        if w is None:
            assert g.numel() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    ref = reference.elbo(
        recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs, beta=0.5, reduction=reduction
    )
    for o, r in zip(outs[:3], ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    no_grad = ops.elbo(x, recon, mu, logvar, obs, likelihood, _BETA, reduction, False)
    assert all(g.numel() == 0 for g in no_grad[3:])


# --------------------------------------------------------------------------- C++ input checks


def _bad_calls():
    """(error type, a regex of what the message names, the call on tensors made by `r`)."""
    V, T = ValueError, TypeError
    return [
        (V, "`logits` has shape", lambda r: ops.bernoulli_log_prob(r(3, 4), r(3, 5), 1)),
        (V, "`event_dims`=5", lambda r: ops.bernoulli_log_prob(r(3, 4), r(3, 4), 5)),
        (V, "`event_dims`=-1", lambda r: ops.gaussian_kl(r(3, 4), r(3, 4), None, None, -1)),
        (
            T,
            "`logits` has dtype",
            lambda r: ops.bernoulli_log_prob(r(3, 4), r(3, 4).double(), 1),
        ),
        (
            T,
            "`x` has dtype",
            lambda r: ops.bernoulli_log_prob(r(3, 4).long(), r(3, 4).long(), 1),
        ),
        (V, "`logvar` has shape", lambda r: ops.gaussian_log_prob(r(3, 4), r(3, 4), r(3), 1)),
        (V, "`prior_mu` has shape", lambda r: ops.gaussian_kl(r(3, 4), r(3, 4), r(5), None, 1)),
        (V, "`logvar` has shape", lambda r: ops.reparameterize(r(3, 4), r(4), None)),
        (V, "`num_samples`", lambda r: ops.reparameterize(r(3, 4), r(3, 4), 0)),
        (
            V,
            "`mu` has batch size",
            lambda r: ops.elbo(
                r(3, 4), r(3, 4), r(2, 2), r(2, 2), None, "bernoulli", _ONE, "mean", False
            ),
        ),
        (
            V,
            "unknown likelihood",
            lambda r: ops.elbo(
                r(3, 4), r(3, 4), r(3, 2), r(3, 2), None, "foo", _ONE, "mean", False
            ),
        ),
        (
            V,
            "unknown reduction",
            lambda r: ops.elbo(
                r(3, 4), r(3, 4), r(3, 2), r(3, 2), None, "bernoulli", _ONE, "avg", False
            ),
        ),
        (
            V,
            "`beta` must be",  # a (2,) beta: one weight, not one per sample
            lambda r: ops.elbo(
                r(3, 4), r(3, 4), r(3, 2), r(3, 2), None, "bernoulli", r(2), "mean", False
            ),
        ),
        (
            V,
            "`eps` has shape",
            lambda r: ops._reparameterize_backward(r(3, 4), r(3, 4), r(2, 4), [True, True]),
        ),
        (
            # (4, 3) samples of a (4,)-logvar would be read as 3 samples of 4: refused.
            V,
            "`eps` has shape",
            lambda r: ops._reparameterize_backward(r(4, 3), r(4), r(4, 3), [True, True]),
        ),
        (
            T,
            "`eps` has dtype",
            lambda r: ops._reparameterize_backward(
                r(3, 4), r(3, 4), r(3, 4).double(), [True, True]
            ),
        ),
        (
            V,
            "`grad` has shape",
            lambda r: ops._bernoulli_log_prob_backward(r(2), r(3, 4), r(3, 4), 1, [True, True]),
        ),
        (
            T,
            "`grad` has dtype .* but `x` has",
            lambda r: ops._gaussian_log_prob_backward(
                r(3).double(), r(3, 4), r(3, 4), r(4), 1, [True, True, True]
            ),
        ),
        (
            V,
            "`event_dims`=3",
            lambda r: ops._gaussian_kl_backward(
                r(3), r(3, 4), r(3, 4), None, None, 3, [True, True, False, False]
            ),
        ),
    ]


def _real(*shape):
    return torch.rand(*shape)


def _meta(*shape):
    return torch.empty(*shape, device="meta")


@pytest.mark.fused_only
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_direct_op_checks_input(case):
    # Calling torch.ops.vae_fast.* directly (bypassing the Python checks) still fails
    # cleanly, naming the argument, instead of reading out of bounds; with the error
    # type the public functions raise, and the same on meta tensors (the fake kernels
    # check what the C++ glue checks, so compiled graphs refuse what eager calls refuse).
    error, what, call = _bad_calls()[case]
    for make_tensor in (_real, _meta):
        with pytest.raises(error, match=r"vae_fast\.\w+: .*" + what):  # (`what`: a regex)
            call(make_tensor)


@pytest.mark.fused_only
@pytest.mark.parametrize(
    "op, args, flags",
    [
        ("_bernoulli_log_prob_backward", ((3,), (3, 4), (3, 4), 1), 2),
        ("_gaussian_log_prob_backward", ((3,), (3, 4), (3, 4), (4,), 1), 3),
        ("_gaussian_kl_backward", ((3,), (3, 4), (3, 4), None, None, 1), 4),
        ("_reparameterize_backward", ((3, 4), (3, 4), (3, 4)), 2),
    ],
)
def test_fake_backward_kernels_check_the_output_mask(op, args, flags):
    # A fake kernel that returned one output per flag handed the dispatcher more outputs
    # than the schema has (a segfault with too many flags). (On real tensors torch's own
    # argument parsing refuses a wrong count first.)
    tensors = [_meta(*a) if isinstance(a, tuple) else a for a in args]
    for mask in ([True] * (flags - 1), [True] * (flags + 1)):
        with pytest.raises(ValueError, match=rf"`output_mask` must be {flags} bools"):
            getattr(ops, op)(*tensors, mask)
    outputs = getattr(ops, op)(*tensors, [True] * flags)
    assert len(outputs) == flags


# --------------------------------------------------------------------------- torch.compile


class _TinyVAE(torch.nn.Module):
    def __init__(self, d: int, z: int, h: int, gaussian: bool):
        super().__init__()
        self.enc = torch.nn.Sequential(
            torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, 2 * z)
        )
        self.dec = torch.nn.Sequential(
            torch.nn.Linear(z, h), torch.nn.Tanh(), torch.nn.Linear(h, d)
        )
        self.obs_logvar = torch.nn.Parameter(torch.zeros(d)) if gaussian else None

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = vae_fast.reparameterize(mu, logvar)
        kind = "bernoulli" if self.obs_logvar is None else "gaussian"
        loss, ll, kl = vae_fast.elbo(
            self.dec(z), x, mu, logvar, likelihood=kind, obs_logvar=self.obs_logvar, beta=0.5
        )
        return loss, ll, kl


@pytest.mark.slow  # torch.compile with Inductor: tens of seconds
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch's own tracing internals
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_compile_training_step(likelihood):
    # The fake kernels and the autograd formulas let torch.compile trace one training
    # step's forward and backward without a graph break; the compiled step computes the
    # same loss and gradients as eager (same seed, same eps) and training makes progress.
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _TinyVAE(20, 4, 16, likelihood == "gaussian")
    compiled = _TinyVAE(20, 4, 16, likelihood == "gaussian")
    compiled.load_state_dict(eager.state_dict())
    step_fn = torch.compile(compiled, fullgraph=True, dynamic=False)
    opt = torch.optim.Adam(compiled.parameters(), lr=1e-2)
    x = (torch.rand(32, 20) < 0.5).float()

    torch.manual_seed(1)
    loss_e, ll_e, kl_e = eager(x)
    loss_e.backward()
    torch.manual_seed(1)
    loss_c, ll_c, kl_c = step_fn(x)
    loss_c.backward()
    for a, b in ((loss_c, loss_e), (ll_c, ll_e), (kl_c, kl_e)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (name, pc), pe in zip(compiled.named_parameters(), eager.parameters()):
        assert pc.grad is not None, name
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)

    first = loss_c.item()
    for _ in range(30):
        opt.step()
        opt.zero_grad()
        loss, _, _ = step_fn(x)
        loss.backward()
    assert loss.item() < first


# --------------------------------------------------------------------------- double backward


def _double_backward_cases():
    x01 = _x01((3, 5), "cpu")
    return {
        "bernoulli_log_prob": (lambda a: vae_fast.bernoulli_log_prob(x01, a), (3, 5)),
        "gaussian_log_prob": (
            lambda a: vae_fast.gaussian_log_prob(x01, a, torch.zeros((), dtype=a.dtype)),
            (3, 5),
        ),
        "gaussian_kl": (lambda a: vae_fast.gaussian_kl(a, a.detach()), (3, 5)),
        "reparameterize": (
            lambda a: vae_fast.reparameterize(
                a.detach(), a, generator=torch.Generator().manual_seed(0)
            ).square(),
            (3, 5),
        ),
        "elbo": (lambda a: vae_fast.elbo(a, x01, a[:, :2].detach(), a[:, 2:4])[0], (3, 5)),
    }


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("name", list(_double_backward_cases()))
def test_double_backward_not_silently_wrong(name, vae_backend, reference_draws_like_fused):
    # Second derivatives (gradient penalties, Hessian-vector products) are not part of the
    # API, but asking for them must either work or raise, never quietly return nothing.
    fn, shape = _double_backward_cases()[name]
    a = _t(shape, "cpu", grad=True, seed=5)
    try:
        (g,) = torch.autograd.grad(fn(a).sum(), a, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), a, allow_unused=True)
    except RuntimeError:
        return  # refused loudly: fine
    with vae_fast.backend("reference"):
        b = a.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(fn(b).sum(), b, create_graph=True)
        (want,) = torch.autograd.grad(gr.square().sum(), b, allow_unused=True)
    assert gg is not None or want is None, f"{name}: second derivative silently missing"
    if want is not None:
        torch.testing.assert_close(gg, want, rtol=1e-10, atol=1e-12)


def _all_ops(x, recon, mu, logvar, obs, prior_mu, prior_logvar):
    z = vae_fast.reparameterize(mu, logvar, num_samples=2)
    lb = vae_fast.bernoulli_log_prob(x, recon)
    lg = vae_fast.gaussian_log_prob(x, recon, obs, event_dims=1)
    kl = vae_fast.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    loss, ll, kl2 = vae_fast.elbo(recon, x, mu, logvar, likelihood="gaussian", obs_logvar=obs)
    loss_n, _, _ = vae_fast.elbo(recon, x, mu, logvar, reduction="none", beta=0.5)
    return (
        loss
        + z.square().mean()
        + lb.sum()
        + lg.sum()
        + kl.sum()
        + ll.sum()
        + kl2.sum()
        + loss_n.sum()
    )


@pytest.mark.slow  # torch.compile
def test_compile_dynamic_batch():
    # Symbolic batch sizes through every fake kernel and autograd formula (a last, smaller
    # batch of an epoch must not break the compiled step). aot_eager: the tracing is what
    # is under test here, not inductor's code generation.
    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (8, 5, 3):
        args = (
            _t((batch, 6), "cpu", low=0.0, high=1.0, seed=batch),
            _t((batch, 6), "cpu", grad=True, seed=batch + 1),
            _t((batch, 3), "cpu", grad=True, seed=batch + 2),
            _t((batch, 3), "cpu", low=-1.0, high=1.0, grad=True, seed=batch + 3),
            _t((6,), "cpu", low=-1.0, high=1.0, grad=True),
            _t((3,), "cpu", grad=True),
            _t((batch, 3), "cpu", low=-1.0, high=1.0, grad=True, seed=batch + 4),
        )
        torch.manual_seed(0)
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, [a for a in args if a.requires_grad])
        torch.manual_seed(0)
        want = _all_ops(*args)
        want_grads = torch.autograd.grad(want, [a for a in args if a.requires_grad])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    # Under autocast the losses run in float32 (as torch's own losses do): half inputs
    # give a float32 result equal to the float32 computation on the upcast inputs.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 9, generator=g).to(dtype)
    recon, mu, logvar = (torch.randn(s, generator=g).to(dtype) for s in ((4, 9), (4, 3), (4, 3)))
    with torch.autocast("cpu", dtype=dtype):
        got = vae_fast.elbo(recon, x, mu, logvar)
        got_b = vae_fast.bernoulli_log_prob(x, recon)
    want = vae_fast.elbo(recon.float(), x.float(), mu.float(), logvar.float())
    for a, b in zip((*got, got_b), (*want, vae_fast.bernoulli_log_prob(x.float(), recon.float()))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.fused_only
def test_fake_kernels_check_meta_calls():
    # A call with one meta input reaches the fake kernel: it must refuse the mix (not hand
    # back uninitialized CPU tensors), and check all-meta calls as the kernels check real ones.
    ops = torch.ops.vae_fast
    x, meta = torch.rand(4, 5), torch.empty(4, 5, device="meta")
    with pytest.raises(RuntimeError, match="some tensor arguments are on the meta device"):
        ops.bernoulli_log_prob(x, meta, 1)
    with pytest.raises(RuntimeError, match="meta device"):
        ops.elbo(x, x, x, x, None, "bernoulli", torch.tensor(1.0, device="meta"), "mean", False)
    assert ops.bernoulli_log_prob(meta, meta, 1).shape == (4,)
    with pytest.raises(ValueError, match="`logits` has shape"):
        ops.bernoulli_log_prob(meta, torch.empty(4, 6, device="meta"), 1)
    with pytest.raises(ValueError, match="`num_samples`"):
        ops.reparameterize(meta, meta, 0)


@pytest.mark.fused_only
def test_direct_calls_refuse_float8_naming_the_argument():
    # float8 is a floating type to ATen, but no kernel takes it.
    x = torch.rand(4, 5).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="`x` has dtype Float8_e4m3fn"):
        torch.ops.vae_fast.bernoulli_log_prob(x, x, 1)
