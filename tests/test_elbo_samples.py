"""elbo(..., num_samples=K): the multi-sample ELBO.

recon is the decoder's output for K samples, (K, *x.shape); the log-likelihood is the
mean over the samples (x broadcast over them inside the op, never repeated), the
analytic KL is computed once. Each test says what would be wrong if it failed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, EXACT_DTYPES, RTOL, make
from torch.distributions import Bernoulli, Normal, kl_divergence

import vae_fast

REDUCTIONS = ["mean", "sum", "none"]


def _problem(k, batch, event, latent, dtype, device, gen, likelihood):
    x = make((batch, *event), dtype, device, low=0.0, high=1.0, gen=gen)
    if likelihood == "bernoulli":
        x = x.round()
    recon = make((k, batch, *event), dtype, device, kind="normal", gen=gen).mul(3)
    mu = make((batch, latent), dtype, device, kind="normal", gen=gen)
    logvar = make((batch, latent), dtype, device, low=-2.0, high=1.0, gen=gen)
    obs = make(event[-1:], dtype, device, low=-1.0, high=0.5, gen=gen)  # per feature
    return x, recon, mu, logvar, (obs if likelihood == "gaussian" else None)


def _truth(x, recon, mu, logvar, obs, likelihood, beta, reduction):
    """In fp64 with torch.distributions: mean over samples of log p(x|recon_k), KL once."""
    x, recon, mu, logvar = (t.double() for t in (x, recon, mu, logvar))
    dims = tuple(range(2, recon.dim()))
    if likelihood == "bernoulli":
        ll_k = Bernoulli(logits=recon).log_prob(x.expand(recon.shape)).sum(dims)
    else:
        sd = torch.exp(0.5 * obs.double()).expand(recon.shape)
        ll_k = Normal(recon, sd).log_prob(x.expand(recon.shape)).sum(dims)
    ll = ll_k.mean(0)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    per_row = beta * kl - ll
    loss = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    return loss, ll, kl


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("k", [1, 3])  # one sample (the plain ELBO's values), several
def test_values_and_gradients_match_distributions(device, dtype, likelihood, k, gen):
    # Odd sizes in every dim (a vector remainder in each row); gradients of recon, mu,
    # logvar and obs_logvar against autograd through the fp64 truth.
    x, recon, mu, logvar, obs = _problem(k, 7, (3, 13), 5, dtype, device, gen, likelihood)
    leaves = [t.requires_grad_() for t in (recon, mu, logvar, obs) if t is not None]
    loss, ll, kl = vae_fast.elbo(
        recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs, beta=0.7, num_samples=k
    )
    want = _truth(x, recon, mu, logvar, obs, likelihood, 0.7, "mean")
    rtol = RTOL[dtype]
    for got, w in zip((loss, ll, kl), want):
        w = w.detach()
        torch.testing.assert_close(got.double(), w, rtol=rtol, atol=rtol * float(w.abs().max()))
    grads = torch.autograd.grad(loss, leaves)
    want_grads = torch.autograd.grad(want[0], leaves)
    for g, w in zip(grads, want_grads):
        w = w.double()
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * float(w.abs().max()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_per_row_gradients(reduction, gen):
    # "none" and gradients of the returned log-likelihood take the per-row backward,
    # which expands x over the samples: the same numbers as the fused forward's path.
    x, recon, mu, logvar, _ = _problem(4, 6, (10,), 3, torch.float64, "cpu", gen, "bernoulli")
    recon.requires_grad_()
    x.requires_grad_()  # d/dx summed back over the samples
    loss, ll, _ = vae_fast.elbo(recon, x, mu, logvar, reduction=reduction, num_samples=4)
    out = loss.sum() + 0.3 * ll.sum()
    got = torch.autograd.grad(out, (recon, x))
    w_loss, w_ll, _ = _truth(x, recon, mu, logvar, None, "bernoulli", 1.0, reduction)
    want = torch.autograd.grad(w_loss.sum() + 0.3 * w_ll.sum(), (recon, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_k1_equals_the_single_sample_elbo(gen):
    # recon of shape (1, B, D) with num_samples=1 is elbo on recon[0], value and gradient.
    x, recon, mu, logvar, _ = _problem(1, 9, (11,), 4, torch.float64, "cpu", gen, "bernoulli")
    recon.requires_grad_()
    one = vae_fast.elbo(recon, x, mu, logvar, num_samples=1)[0]
    plain = vae_fast.elbo(recon[0], x, mu, logvar)[0]
    torch.testing.assert_close(one, plain, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(one, recon)[0][0], torch.autograd.grad(plain, recon)[0][0]
    )


def test_gradcheck(gen):
    x, recon, mu, logvar, obs = _problem(2, 3, (4,), 2, torch.float64, "cpu", gen, "gaussian")
    leaves = tuple(t.requires_grad_() for t in (recon, mu, logvar, obs))

    def fn(r, m, lv, o):
        return vae_fast.elbo(r, x, m, lv, likelihood="gaussian", obs_logvar=o, num_samples=2)[0]

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.fused_only
def test_inplace_grad(gen):
    # The gradient written over a (K, B, D) recon is the fresh-tensor one.
    x, recon, mu, logvar, _ = _problem(3, 5, (8,), 2, torch.float32, "cpu", gen, "bernoulli")
    leaf = recon.clone().requires_grad_()
    fresh = torch.autograd.grad(vae_fast.elbo(leaf * 1, x, mu, logvar, num_samples=3)[0], leaf)
    leaf2 = recon.clone().requires_grad_()
    out = leaf2 * 1
    loss = vae_fast.elbo(out, x, mu, logvar, num_samples=3, inplace_grad=True)[0]
    torch.testing.assert_close(out.detach(), fresh[0])  # written over recon, not beside it
    torch.testing.assert_close(torch.autograd.grad(loss, leaf2)[0], fresh[0])


@pytest.mark.fused_only
def test_opcheck(gen):
    x, recon, mu, logvar, obs = _problem(2, 3, (5,), 2, torch.float32, "cpu", gen, "gaussian")
    for t in (recon, mu, logvar, obs):
        t.requires_grad_()
    beta = torch.ones((), dtype=torch.float64)
    args = (x, recon, mu, logvar, obs, "gaussian", beta, "mean", True, True)
    torch.library.opcheck(torch.ops.vae_fast.elbo.default, args)


@pytest.mark.slow
@pytest.mark.fused_only
def test_compiles_fullgraph(gen):
    x, recon, mu, logvar, _ = _problem(2, 4, (6,), 3, torch.float32, "cpu", gen, "bernoulli")

    @torch.compile(fullgraph=True)
    def f(r, m, lv):
        return vae_fast.elbo(r, x, m, lv, num_samples=2)[0]

    torch.testing.assert_close(
        f(recon, mu, logvar), vae_fast.elbo(recon, x, mu, logvar, num_samples=2)[0]
    )


@pytest.mark.parametrize(
    "shape, num_samples, message",
    [
        ((2, 3, 5), None, "pass num_samples=K"),  # a K dim without num_samples: not guessed
        ((2, 3, 5), 3, r"must have shape \(3, \*x.shape\)"),  # K disagrees
        ((3, 5), 2, r"must have shape \(2, \*x.shape\)"),  # num_samples without a K dim
        ((2, 3, 5), 0, "must be a positive int"),
        ((2, 4, 5), 2, "`recon` has shape"),  # the sample's shape is not x's
    ],
)
def test_shape_errors_name_recon_or_num_samples(shape, num_samples, message):
    x, mu = torch.rand(3, 5).round(), torch.zeros(3, 2)
    with pytest.raises(ValueError, match=message):
        vae_fast.elbo(torch.zeros(shape), x, mu, mu, num_samples=num_samples)
