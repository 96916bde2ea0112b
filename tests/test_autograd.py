"""Autograd wherever torch can reach it, against the reference backend in float64.

Covers: higher-order gradients (Hessians, Hessian-vector products, gradient
penalties, gradgradcheck of every op), forward-mode AD, the torch.func transforms
(grad, vmap(grad), jacrev, jacfwd, vmap and its randomness modes), beta as a tensor
(its gradient, and no recompiles under torch.compile), gradients only where they
flow, no host read of grad_output off the CPU, exact values at infinite logits,
meta tensors and autocast, and gradients that the caller may change in place.

Each case uses one small shape with odd sizes (no vector-width multiples): what is
under test is the autograd route, not the kernels (tests/test_<op>.py cover those).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DEVICES
from torch._dynamo.utils import counters
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import vae_fast
from vae_fast._autograd import is_exactly_one as _is_exactly_one

pytestmark = pytest.mark.fused_only  # compares the fused route with the reference

LIKELIHOODS = ["bernoulli", "gaussian"]
REDUCTIONS = ["mean", "sum", "none"]
B, D, Z = 3, 5, 2
F64 = torch.float64


def _tensor(*shape, seed, low=-1.0, high=1.0, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=F64) * (high - low) + low
    return t.to(device).requires_grad_(requires_grad)


def _elbo_inputs(likelihood, device="cpu", requires_grad=True):
    """x, recon, mu, logvar, obs_logvar (a per-feature one for the Gaussian)."""
    x = _tensor(B, D, seed=0, low=0.0, device=device)
    if likelihood == "bernoulli":
        x = x.round()
    recon = _tensor(B, D, seed=1, low=-2.0, high=2.0, device=device, requires_grad=requires_grad)
    mu = _tensor(B, Z, seed=2, device=device, requires_grad=requires_grad)
    logvar = _tensor(B, Z, seed=3, device=device, requires_grad=requires_grad)
    obs = None
    if likelihood == "gaussian":
        obs = _tensor(D, seed=4, device=device, requires_grad=requires_grad)
    return x, recon, mu, logvar, obs


def _both_backends(fn):
    """fn() run on the fused ops and on the reference."""
    fused = fn()
    with vae_fast.backend("reference"):
        ref = fn()
    return fused, ref


def _assert_same(got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _eps(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# Each op as a function of its differentiable tensors, with everything else fixed
# (reparameterize with a fixed generator, so that every call draws the same eps).
def _single_ops():
    x01 = _tensor(B, D, seed=0, low=0.0)
    return {
        "bernoulli_log_prob": (
            lambda logits: vae_fast.bernoulli_log_prob(x01, logits),
            (_tensor(B, D, seed=1, low=-3.0, high=3.0),),
        ),
        "gaussian_log_prob": (
            lambda x, mean, logvar: vae_fast.gaussian_log_prob(x, mean, logvar),
            (_tensor(B, D, seed=1), _tensor(B, D, seed=2), _tensor(D, seed=3)),
        ),
        "gaussian_kl": (
            lambda mu, logvar, pm, plv: vae_fast.gaussian_kl(mu, logvar, pm, plv),
            (_tensor(B, Z, seed=1), _tensor(B, Z, seed=2), _tensor(Z, seed=3), _tensor(Z, seed=4)),
        ),
        "reparameterize": (
            lambda mu, logvar: vae_fast.reparameterize(
                mu, logvar, num_samples=2, generator=torch.Generator().manual_seed(0)
            ),
            (_tensor(B, Z, seed=1), _tensor(B, Z, seed=2)),
        ),
    }


# --------------------------------------------------------------------------- 1. higher order


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_elbo_hessian_wrt_recon(likelihood, reduction):
    # The fast path hands back forward-pass gradients as constants; a Hessian through
    # it used to be all zeros.
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood, requires_grad=False)

    def loss(r):
        kw = {"likelihood": likelihood, "obs_logvar": obs, "reduction": reduction}
        return vae_fast.elbo(r, x, mu, logvar, **kw)[0].sum()

    fused, ref = _both_backends(lambda: torch.autograd.functional.hessian(loss, recon))
    assert ref.abs().max() > 1e-3  # a Hessian worth comparing
    _assert_same(fused, ref)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_elbo_hvp_wrt_all_inputs(likelihood):
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood, requires_grad=False)
    inputs = tuple(t for t in (recon, mu, logvar, obs) if t is not None)
    v = tuple(_tensor(*t.shape, seed=10 + i) for i, t in enumerate(inputs))

    def loss(*ts):
        r, m, lv, *o = ts
        kw = {"likelihood": likelihood, "obs_logvar": o[0] if o else None, "beta": 0.7}
        return vae_fast.elbo(r, x, m, lv, **kw)[0]

    fused, ref = _both_backends(lambda: torch.autograd.functional.hvp(loss, inputs, v)[1])
    _assert_same(fused, ref)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradient_penalty_reaches_the_decoder(likelihood):
    # loss + 10 |d loss / d recon|^2, built with create_graph=True (WAE-GAN, Lipschitz
    # decoders): the penalty's gradient must reach the decoder's weights.
    x, _, mu, logvar, obs = _elbo_inputs(likelihood)
    z = _tensor(B, Z, seed=5)

    def weight_grads():
        decoder = torch.nn.Linear(Z, D, dtype=F64)
        with torch.no_grad():
            decoder.weight.copy_(_tensor(D, Z, seed=6))
            decoder.bias.zero_()
        recon = decoder(z)
        loss = vae_fast.elbo(recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs)[0]
        (g,) = torch.autograd.grad(loss, recon, create_graph=True)
        penalty = 10 * g.square().sum()
        return torch.autograd.grad(penalty, [decoder.weight, decoder.bias])

    fused, ref = _both_backends(weight_grads)
    assert ref[0].abs().max() > 1e-6
    _assert_same(fused, ref)


@pytest.mark.parametrize("name", list(_single_ops()))
def test_gradgradcheck_every_op(name):
    fn, inputs = _single_ops()[name]
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_create_graph_on_a_direct_op_call():
    # torch.ops calls share the route: their recorded backward is the reference's too.
    x = _tensor(B, D, seed=0, low=0.0)
    logits = _tensor(B, D, seed=1, requires_grad=True)
    (g,) = torch.autograd.grad(
        torch.ops.vae_fast.bernoulli_log_prob(x, logits, 1).sum(), logits, create_graph=True
    )
    (gg,) = torch.autograd.grad(g.sum(), logits)
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(gg, -s * (1 - s), rtol=1e-12, atol=1e-14)


def test_recorded_gradient_at_logits_exactly_zero():
    # A zero-initialised decoder layer gives logits of exactly 0, where |l| has no
    # derivative: the recorded (reference) gradient must still be x - sigmoid(0), as the
    # fused first-order one is, and the second derivative -sigmoid'(0) = -1/4.
    x = torch.tensor([[0.25, 1.0, 0.0]], dtype=torch.float64)
    logits = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    (fused,) = torch.autograd.grad(vae_fast.bernoulli_log_prob(x, logits).sum(), logits)
    (recorded,) = torch.autograd.grad(
        vae_fast.bernoulli_log_prob(x, logits).sum(), logits, create_graph=True
    )
    (second,) = torch.autograd.grad(recorded.sum(), logits)
    assert torch.equal(fused, x - 0.5) and torch.equal(recorded, x - 0.5)
    assert torch.equal(second, torch.full_like(x, -0.25))


# --------------------------------------------------------------------------- 2. forward AD


def _tangents(inputs, seed=20):
    return tuple(_tensor(*t.shape, seed=seed + i) for i, t in enumerate(inputs))


@pytest.mark.parametrize("name", list(_single_ops()))
def test_forward_ad_every_op(name):
    fn, inputs = _single_ops()[name]
    tangents = _tangents(inputs)

    def forward_tangent():
        with fwAD.dual_level():
            out = fn(*(fwAD.make_dual(p, t) for p, t in zip(inputs, tangents)))
            return fwAD.unpack_dual(out).tangent

    fused, ref = _both_backends(forward_tangent)
    assert fused is not None
    if name == "reparameterize":  # forward AD runs the reference, which draws with torch.randn
        eps = torch.randn(
            2, *inputs[0].shape, dtype=inputs[0].dtype, generator=torch.Generator().manual_seed(0)
        )
        mu_t, logvar_t = tangents
        ref = mu_t + 0.5 * torch.exp(0.5 * inputs[1]) * eps * logvar_t
    _assert_same(fused, ref)


def _direct_call(op):
    """A torch.ops.vae_fast call of `op` as a function of mu: gaussian_kl's autograd is
    in Python (vae_fast/_autograd.py), elbo's in C++ (csrc/elbo_autograd.cpp)."""
    logvar = _tensor(B, 3, seed=1)
    if op == "gaussian_kl":
        return lambda mu: torch.ops.vae_fast.gaussian_kl(mu, logvar, None, None, 1)
    x, recon = _tensor(B, 4, seed=2).sigmoid().round(), _tensor(B, 4, seed=3)
    beta = torch.tensor(1.0, dtype=torch.float64)
    return lambda mu: torch.ops.vae_fast.elbo(
        x, recon, mu, logvar, None, "bernoulli", beta, "sum", True
    )[0]


@pytest.mark.fused_only
@pytest.mark.parametrize("op", ["gaussian_kl", "elbo"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad_on_a_direct_op_call_raises(op, requires_grad):
    # torch.ops calls have no forward derivative; a tangent must not be dropped silently,
    # whether or not the input also requires grad (two routes through the autograd kernel).
    call = _direct_call(op)
    mu = _tensor(B, 3, seed=0, requires_grad=requires_grad)
    with fwAD.dual_level():
        dual = fwAD.make_dual(mu, torch.ones_like(mu))
        with pytest.raises(RuntimeError, match="vae_fast.*no forward-mode derivative"):
            call(dual)
        # Without a tangent, the op runs as ever inside a dual level.
        assert call(mu).shape in ((B,), ())


@pytest.mark.fused_only
def test_func_grad_of_a_direct_elbo_call_raises_naming_the_way_out():
    # torch refuses a C++ autograd Function under torch.func with an error that names
    # nothing of vae_fast's; the public vae_fast.elbo runs the reference there.
    with pytest.raises(RuntimeError, match="vae_fast.*public vae_fast.elbo"):
        grad(_direct_call("elbo"))(_tensor(B, 3, seed=0))


def test_iwae_sample_has_no_forward_derivative():
    mu, logvar = _tensor(B, 3, seed=0), _tensor(B, 3, seed=1)
    with pytest.raises(RuntimeError, match="iwae_sample has no forward-mode derivative"):
        jvp(lambda m: vae_fast.iwae_sample(m, logvar, 2), (mu,), (torch.ones_like(mu),))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_forward_ad_elbo(likelihood, reduction):
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood, requires_grad=False)
    primals = tuple(t for t in (recon, mu, logvar, obs) if t is not None)

    def loss(*ts):
        r, m, lv, *o = ts
        kw = {"likelihood": likelihood, "obs_logvar": o[0] if o else None}
        return vae_fast.elbo(r, x, m, lv, reduction=reduction, **kw)

    fused, ref = _both_backends(lambda: jvp(loss, primals, _tangents(primals))[1])
    _assert_same(fused, ref)


# --------------------------------------------------------------------------- 3. torch.func


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_func_grad_jacrev_jacfwd_elbo(likelihood):
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood, requires_grad=False)

    def loss(r, m, lv):
        return vae_fast.elbo(r, x, m, lv, likelihood=likelihood, obs_logvar=obs)[0]

    def rows(r):
        return vae_fast.elbo(r, x, mu, logvar, likelihood=likelihood, obs_logvar=obs)[1]

    for transform in (
        lambda: grad(loss, argnums=(0, 1, 2))(recon, mu, logvar),
        lambda: jacrev(rows)(recon),
        lambda: jacfwd(rows)(recon),
        lambda: jacrev(grad(loss))(recon, mu, logvar),  # a Hessian block, by torch.func
    ):
        fused, ref = _both_backends(transform)
        _assert_same(fused, ref)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_per_sample_gradients(likelihood):
    # vmap(grad(...)): one gradient per sample, each that of its own one-row loss.
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood, requires_grad=False)

    def one_sample_loss(r, xi, m, lv):
        kw = {"likelihood": likelihood, "obs_logvar": obs}
        return vae_fast.elbo(r[None], xi[None], m[None], lv[None], **kw)[0]

    per_sample = vmap(grad(one_sample_loss, argnums=(0, 2, 3)))(recon, x, mu, logvar)
    for i in range(B):
        want = _both_backends(
            lambda: grad(one_sample_loss, argnums=(0, 2, 3))(recon[i], x[i], mu[i], logvar[i])  # noqa: B023
        )[1]
        _assert_same(tuple(g[i] for g in per_sample), want)


@pytest.mark.parametrize("name", list(_single_ops()))
def test_func_transforms_every_op(name):
    fn, inputs = _single_ops()[name]
    total = lambda *ts: fn(*ts).sum()  # noqa: E731
    stacked = tuple(torch.stack([t, 0.5 * t]) for t in inputs)  # a new leading dim to map
    checks = [lambda: grad(total, argnums=tuple(range(len(inputs))))(*inputs)]
    if name != "reparameterize":  # its draw differs by backend: checked below
        checks += [
            lambda: jacrev(fn)(*inputs),
            lambda: jacfwd(fn)(*inputs),
            lambda: vmap(fn)(*stacked),
        ]
    for check in checks:
        fused, ref = _both_backends(check)
        if name == "reparameterize":  # d(sum z)/dmu = K; d/dlogvar depends on eps only
            torch.testing.assert_close(fused[0], torch.full_like(inputs[0], 2.0))
        else:
            _assert_same(fused, ref)


# torch.autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run the
# backward under vmap with a batched grad_output: elbo's and iwae's backward scales its
# saved gradients by it, which must happen out of place and without reading its value.
@pytest.mark.parametrize("op", ["elbo", "iwae"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batched_backward(op, reduction):
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli", requires_grad=False)
    if op == "elbo":
        fn = lambda r, m, lv: vae_fast.elbo(r, x, m, lv, reduction=reduction)[0]  # noqa: E731
    else:
        recon = torch.stack([recon, 0.5 * recon])
        z = torch.stack([_eps((B, Z)), _eps((B, Z), seed=8)])
        fn = lambda r, m, lv: vae_fast.iwae(r, x, z, m, lv, reduction=reduction)[0]  # noqa: E731
    inputs = (recon, mu, logvar)
    jac = lambda: torch.autograd.functional.jacobian(fn, inputs, vectorize=True)  # noqa: E731
    fused, ref = _both_backends(jac)
    _assert_same(fused, ref)
    # A batch of two cotangents: the second is twice the first.
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    cotangents = torch.stack([torch.ones_like(loss), torch.full_like(loss, 2.0)])
    grads = torch.autograd.grad(loss, leaves, cotangents, is_grads_batched=True)
    for g in grads:
        torch.testing.assert_close(g[1], 2 * g[0], rtol=1e-12, atol=0)


def test_vmap_randomness_modes_of_reparameterize():
    mu, logvar = torch.zeros(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(vae_fast.reparameterize)(mu, logvar)
    same = vmap(vae_fast.reparameterize, randomness="same")(mu, logvar)
    assert torch.equal(same, same[:1].expand_as(same))
    different = vmap(vae_fast.reparameterize, randomness="different")(mu, logvar)
    assert not torch.equal(different[0], different[1])
    # Both are standard normal draws, in mu's shape per row.
    assert same.shape == different.shape == (4, 3)


def test_direct_random_op_under_vmap_follows_different_or_raises():
    # The kernel draws for its whole input: one draw per row ("different") it can give,
    # as torch's fallback did; "error" must raise and "same" would need one shared draw.
    mu, logvar = torch.zeros(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64)
    op = lambda m, lv: torch.ops.vae_fast.reparameterize(m, lv)[0]  # noqa: E731
    for randomness in ("error", "same"):
        with pytest.raises(RuntimeError, match=r"vae_fast: .*call vae_fast\.reparameterize"):
            vmap(op, randomness=randomness)(mu, logvar)
    z = vmap(op, randomness="different")(mu, logvar)
    assert z.shape == (4, 3) and not torch.equal(z[0], z[1])
    # mu batched, logvar shared, K samples per row: z is (rows, K, 3).
    ks = vmap(
        lambda m: torch.ops.vae_fast.reparameterize(m, logvar[0], 2)[0],
        randomness="different",
    )(mu)
    assert ks.shape == (4, 2, 3) and not torch.equal(ks[0], ks[1])


# torch.compile traces torch.func transforms and forward AD as well: inside them the
# public functions must still take the reference (the fused ops have no batching rule
# or forward derivative), eager and compiled alike.
@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap", "forward_ad"])
def test_compiled_transforms_run_the_reference(transform):
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli", requires_grad=False)
    loss = lambda r, m, lv: vae_fast.elbo(r, x, m, lv, beta=0.7)[0]  # noqa: E731
    ones = tuple(torch.ones_like(t) for t in (recon, mu, logvar))

    def forward_ad(r, m, lv):
        with fwAD.dual_level():
            out = loss(fwAD.make_dual(r, ones[0]), m, lv)
            return fwAD.unpack_dual(out).tangent

    fn = {
        "grad": lambda r, m, lv: grad(loss, argnums=(0, 1, 2))(r, m, lv),
        "jvp": lambda r, m, lv: jvp(loss, (r, m, lv), ones),
        "vmap": lambda r, m, lv: vmap(vae_fast.gaussian_kl)(m, lv),
        "forward_ad": forward_ad,
    }[transform]
    with vae_fast.backend("reference"):
        want = fn(recon, mu, logvar)
    torch._dynamo.reset()
    _assert_same(torch.compile(fn, fullgraph=True, backend="aot_eager")(recon, mu, logvar), want)


def test_compiled_vmap_follows_the_randomness_mode():
    mu, logvar = torch.zeros(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64)
    torch._dynamo.reset()
    same = torch.compile(
        vmap(vae_fast.reparameterize, randomness="same"), fullgraph=True, backend="aot_eager"
    )(mu, logvar)
    assert torch.equal(same, same[:1].expand_as(same))


def test_compiled_reference_checks_targets_in_the_graph():
    # The reference's target check cannot steer Python under torch.compile: it is an
    # assertion in the graph, which raises when it runs (and passes good data).
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli", requires_grad=False)
    fn = lambda xs: vae_fast.elbo(recon, xs, mu, logvar)[0]  # noqa: E731
    torch._dynamo.reset()
    with vae_fast.backend("reference"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        _assert_same(compiled(x), fn(x))
        with pytest.raises(RuntimeError, match="`x` holds Bernoulli targets outside"):
            compiled(x * 255)


# --------------------------------------------------------------------------- 4. beta


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_beta_tensor_gets_its_gradient(likelihood, reduction):
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood)

    def grads():
        beta = torch.tensor(0.3, dtype=F64, requires_grad=True)
        kw = {"likelihood": likelihood, "obs_logvar": obs, "reduction": reduction}
        loss = vae_fast.elbo(recon, x, mu, logvar, beta=beta, **kw)[0]
        return torch.autograd.grad(loss.sum() * 1.5, [beta, recon, mu])

    fused, ref = _both_backends(grads)
    _assert_same(fused, ref)


@pytest.mark.parametrize(
    "beta, error",
    [
        (torch.ones(1), ValueError),  # one element, but not 0-d: no silent broadcast
        (torch.ones(3), ValueError),
        (torch.tensor(1), ValueError),  # an integer tensor
        ("1.0", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_beta_raises_naming_it(beta, error):
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli")
    with pytest.raises(error, match="`beta`"):
        vae_fast.elbo(recon, x, mu, logvar, beta=beta)


def test_numpy_numbers_are_numbers():
    # A schedule computed with numpy (np.linspace for a KL warm-up, np.int64 counts):
    # the same result as the Python number, not a "must be a number" refusal.
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli", requires_grad=False)
    want = vae_fast.elbo(recon, x, mu, logvar, beta=0.5)[0]
    for beta in (np.float32(0.5), np.float64(0.5)):
        assert torch.equal(vae_fast.elbo(recon, x, mu, logvar, beta=beta)[0], want)
    assert torch.equal(vae_fast.elbo(recon, x, mu, logvar, beta=np.int64(1))[0],
                       vae_fast.elbo(recon, x, mu, logvar, beta=1)[0])  # fmt: skip
    two = torch.stack([recon, recon])
    assert torch.equal(
        vae_fast.elbo(two, x, mu, logvar, num_samples=np.int64(2))[0],
        vae_fast.elbo(two, x, mu, logvar, num_samples=2)[0],
    )
    assert vae_fast.reparameterize(mu, logvar, num_samples=np.int32(3)).shape == (3, B, Z)
    assert vae_fast.iwae_sample(mu, logvar, np.int64(3)).shape == (3, B, Z)
    assert torch.equal(vae_fast.bernoulli_log_prob(x, recon, event_dims=np.int64(1)),
                       vae_fast.bernoulli_log_prob(x, recon, event_dims=1))  # fmt: skip


@pytest.mark.slow
def test_changing_beta_does_not_recompile():
    # A KL warm-up: beta changes every step. A 0-d tensor (and ELBOLoss, which keeps
    # beta in one) compiles once; a Python float at most twice (dynamo specializes the
    # first value, then makes it symbolic), and never hits the recompile limit.
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli")

    def step(x, recon, mu, logvar, beta):
        return vae_fast.elbo(recon, x, mu, logvar, beta=beta)[0]

    for make_beta, max_graphs in ((lambda b: torch.tensor(b, dtype=F64), 1), (float, 2)):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for i in range(12):
            beta = 0.05 + i / 12
            compiled(x, recon, mu, logvar, make_beta(beta)).backward()
            with vae_fast.backend("reference"):
                want = step(x, recon, mu, logvar, beta)
            torch.testing.assert_close(compiled(x, recon, mu, logvar, make_beta(beta)), want)
        assert counters["stats"]["unique_graphs"] <= max_graphs
    torch._dynamo.reset()
    counters.clear()
    loss_fn = vae_fast.nn.ELBOLoss()
    compiled = torch.compile(loss_fn, backend="aot_eager")
    for i in range(12):
        loss_fn.beta = i / 12
        compiled(recon, x, mu, logvar)[0].backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# ------------------------------------------------------------------------ 5. where gradients flow


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradients_only_where_they_flow(likelihood):
    # Optimizers treat no gradient and a zero gradient differently (weight decay,
    # momentum): a backward through one term leaves the other term's inputs at None.
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood)
    _, ll, kl = vae_fast.elbo(recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs)
    ll.sum().backward()
    assert mu.grad is None and logvar.grad is None and recon.grad is not None
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood)
    _, ll, kl = vae_fast.elbo(recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs)
    kl.sum().backward()
    assert recon.grad is None and mu.grad is not None
    assert obs is None or obs.grad is None


def test_recorded_gradients_only_where_they_flow():
    # The same with create_graph=True (the reference's recorded vector-Jacobian product),
    # and for iwae's log weights under "stl", which drops log q's direct dependence on mu.
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli")
    _, _, kl = vae_fast.elbo(recon, x, mu, logvar)
    g_recon, g_mu = torch.autograd.grad(kl.sum(), [recon, mu], create_graph=True, allow_unused=True)
    assert g_recon is None and g_mu is not None and g_mu.requires_grad
    z = _tensor(4, B, mu.shape[1], seed=7)
    recon_k = recon.detach().expand(4, *recon.shape).requires_grad_()
    _, log_w = vae_fast.iwae(recon_k, x, z, mu, logvar, estimator="stl")
    assert torch.autograd.grad(log_w.sum(), [mu], allow_unused=True) == (None,)


# --------------------------------------------------------------------------- 6. no host sync


def test_the_scale_decision_reads_nothing_off_the_cpu():
    # grad_output == 1 is read only on the CPU, where it is free. A fake CUDA tensor
    # stands in for a real one: reading its value would raise.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not _is_exactly_one(torch.ones((), device="cuda"))
    assert not _is_exactly_one(torch.ones((), device="meta"))
    assert _is_exactly_one(torch.ones(()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_training_step_has_no_host_sync():
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli", device="cuda")
    beta = torch.tensor(0.5, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:  # validating targets reads a flag back (a sync): off, as a trusting loop runs
        loss = vae_fast.elbo(recon, x, mu, logvar, beta=beta, validate_args=False)[0]
        (2.0 * loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert recon.grad is not None


# --------------------------------------------------------------------------- 7. infinite logits


INF = math.inf
# (x, logit, log p, d/dlogit, d/dx): every case where the maths has a value. d/dx is
# the logit, but 0 where log p is its limit 0 (the reference's where() makes it so).
INFINITE_LOGITS = [
    (0.0, INF, -INF, -1.0, INF),
    (1.0, INF, 0.0, 0.0, 0.0),
    (0.5, INF, -INF, -0.5, INF),
    (0.0, -INF, 0.0, 0.0, 0.0),
    (1.0, -INF, -INF, 1.0, -INF),
    (0.5, -INF, -INF, 0.5, -INF),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infinite_logits(device, dtype):
    x = torch.tensor([[c[0]] for c in INFINITE_LOGITS], dtype=dtype, device=device)
    logits = torch.tensor([[c[1]] for c in INFINITE_LOGITS], dtype=dtype, device=device)
    want = torch.tensor([c[2] for c in INFINITE_LOGITS], dtype=dtype, device=device)
    want_grad = torch.tensor([[c[3]] for c in INFINITE_LOGITS], dtype=dtype, device=device)
    want_grad_x = torch.tensor([[c[4]] for c in INFINITE_LOGITS], dtype=dtype, device=device)
    logits.requires_grad_(True)
    for backend in ("fused", "reference"):
        with vae_fast.backend(backend):
            x_leaf = x.clone().requires_grad_(True)
            got = vae_fast.bernoulli_log_prob(x_leaf, logits)
            g, g_x = torch.autograd.grad(got.sum(), (logits, x_leaf))
        torch.testing.assert_close(got, want, msg=backend)
        torch.testing.assert_close(g, want_grad, msg=backend)
        torch.testing.assert_close(g_x, want_grad_x, msg=backend)
    mu = torch.zeros(len(INFINITE_LOGITS), 2, dtype=dtype, device=device)
    _, ll, _ = vae_fast.elbo(logits, x, mu, mu, reduction="none")
    torch.testing.assert_close(ll, want)
    (g,) = torch.autograd.grad(vae_fast.elbo(logits, x, mu, mu, reduction="sum")[0], logits)
    torch.testing.assert_close(g, -want_grad)


# --------------------------------------------------------------------------- 8. meta, autocast


def test_meta_tensors_infer_shapes():
    m = torch.empty(4, 6, device="meta")
    z = torch.empty(4, 2, device="meta")
    loss, ll, kl = vae_fast.elbo(m, m, z, z)
    assert loss.shape == () and ll.shape == kl.shape == (4,) and ll.device.type == "meta"
    assert vae_fast.gaussian_kl(z, z).shape == (4,)
    assert vae_fast.bernoulli_log_prob(m, m).shape == (4,)
    assert vae_fast.gaussian_log_prob(m, m, m[0]).shape == (4,)
    assert vae_fast.reparameterize(z, z, num_samples=3).shape == (3, 4, 2)


def test_autocast_keeps_float64():
    x, recon, mu, logvar, _ = _elbo_inputs("bernoulli")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vae_fast.elbo(recon, x, mu, logvar)
        half = vae_fast.elbo(recon.bfloat16(), x.float(), mu.float(), logvar.float())
    assert all(t.dtype == F64 for t in got)
    assert all(t.dtype == torch.float32 for t in half)
    _assert_same(got, vae_fast.elbo(recon, x, mu, logvar))


# --------------------------------------------------------------------------- 9. owned gradients


@pytest.mark.parametrize("grad_scale", [1.0, 2.5])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradients_clipped_in_place_do_not_change_a_second_backward(likelihood, grad_scale):
    x, recon, mu, logvar, obs = _elbo_inputs(likelihood)
    inputs = [t for t in (recon, mu, logvar, obs) if t is not None]
    loss = vae_fast.elbo(recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs)[0]
    first = torch.autograd.grad(loss * grad_scale, inputs, retain_graph=True)
    want = [g.clone() for g in first]
    for g in first:
        g.clamp_(-1e-3, 1e-3)  # clipping, in place
    second = torch.autograd.grad(loss * grad_scale, inputs)
    for a, b in zip(second, want):
        assert torch.equal(a, b)
