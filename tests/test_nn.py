"""vae_fast.nn: module shapes, the importance-weighted log-likelihood against direct
computations, and the fused and reference backends agreeing on losses and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, MultivariateNormal, Normal

import vae_fast
from vae_fast.nn import VAE, ConvVAE, ELBOLoss, VAEOutput, importance_log_likelihood

# Every module test runs on both backends; the fused one needs the compiled library.
BACKENDS = ["reference", pytest.param("fused", marks=pytest.mark.fused_only)]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape",
    [
        (5, 64),  # flat rows
        (5, 1, 8, 8),  # images through the MLP: flattened inside, recon keeps the shape
        (1, 64),  # a batch of one
    ],
)
def test_vae_shapes(backend, x_shape):
    torch.manual_seed(0)
    model = VAE(64, 3, hidden=(16, 8))
    x = torch.rand(x_shape)
    with vae_fast.backend(backend):
        out = model(x, generator=_seeded())
        assert isinstance(out, VAEOutput)
        assert out.recon.shape == x.shape
        assert out.mu.shape == out.logvar.shape == out.z.shape == (x.shape[0], 3)
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (x.shape[0], 3)
        assert model.decode(mu).shape == (x.shape[0], 64)
        assert model.sample(7, generator=_seeded()).shape == (7, 64)
        rec = model.reconstruct(x)
        assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1  # probabilities
        ll = model.log_likelihood(torch.bernoulli(x), 10, generator=_seeded())
        assert ll.shape == (x.shape[0],) and torch.isfinite(ll).all() and (ll < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "in_shape",
    [
        (1, 8, 8),  # the digits
        (3, 7, 5),  # odd sides: each decoder level needs its own output padding
        (2, 28, 28),  # MNIST-sized, two channels
    ],
)
def test_conv_vae_shapes(backend, in_shape):
    torch.manual_seed(0)
    model = ConvVAE(in_shape, 4, channels=(4, 8), hidden=16, likelihood="gaussian")
    x = torch.randn(3, *in_shape)
    with vae_fast.backend(backend):
        out = model(x)
        assert out.recon.shape == x.shape
        assert out.mu.shape == out.z.shape == (3, 4)
        assert model.decode(out.z).shape == (3, *in_shape)
        assert model.sample(2).shape == (2, *in_shape)
        assert model.reconstruct(x).shape == x.shape
        loss_fn = ELBOLoss("gaussian", "feature", event_shape=in_shape)
        loss, ll, kl = loss_fn(out.recon, x, out.mu, out.logvar)
        loss.backward()
        assert loss.shape == () and ll.shape == kl.shape == (3,)
        assert loss_fn.obs_logvar.grad.shape == in_shape
        assert all(p.grad is not None for p in model.parameters())
        assert model.log_likelihood(x, 5, obs_logvar=loss_fn.obs_logvar).shape == (3,)


def test_extra_repr_shows_the_configuration():
    assert "in_features=64, latent_dim=3, hidden=(16, 8), likelihood='bernoulli'" in repr(
        VAE(64, 3, hidden=(16, 8))
    )
    assert "in_shape=(1, 8, 8), latent_dim=2, channels=(4,)" in repr(
        ConvVAE((1, 8, 8), 2, channels=(4,))
    )
    r = repr(ELBOLoss("gaussian", "scalar", beta=0.5, reduction="sum"))
    assert r == "ELBOLoss(likelihood='gaussian', obs_logvar='scalar', beta=0.5, reduction='sum')"


# --------------------------------------------------------------------------- ELBOLoss


@pytest.mark.parametrize(
    ("mode", "shape", "learnable"),
    [("fixed", (), False), ("scalar", (), True), ("feature", (4, 3), True)],
)
def test_elbo_loss_owns_the_observation_logvar(mode, shape, learnable):
    loss_fn = ELBOLoss("gaussian", mode, event_shape=(4, 3), init_obs_logvar=-1.0)
    assert loss_fn.obs_logvar.shape == shape
    assert torch.all(loss_fn.obs_logvar == -1.0)
    assert (len(list(loss_fn.parameters())) == 1) == learnable
    x, recon = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    mu, logvar = torch.randn(5, 2), torch.randn(5, 2)
    with vae_fast.backend("reference"):
        loss, ll, kl = loss_fn(recon, x, mu, logvar)
        want, _, _ = vae_fast.elbo(
            recon, x, mu, logvar, likelihood="gaussian", obs_logvar=torch.full(shape, -1.0)
        )
    torch.testing.assert_close(loss, want)
    if learnable:
        loss.backward()
        assert loss_fn.obs_logvar.grad.shape == shape


def test_elbo_loss_beta_is_a_live_attribute():
    # The training command's KL warm-up changes beta between steps.
    x, recon = torch.bernoulli(torch.full((4, 6), 0.5)), torch.randn(4, 6)
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    loss_fn = ELBOLoss()
    with vae_fast.backend("reference"):
        _, ll, kl = loss_fn(recon, x, mu, logvar)
        loss_fn.beta = 0.25
        loss, _, _ = loss_fn(recon, x, mu, logvar)
    torch.testing.assert_close(loss, (0.25 * kl - ll).mean())


def test_elbo_loss_keeps_beta_exact_when_the_module_is_cast():
    # .to(bfloat16) casts floating buffers: beta stays the float64 it was set to.
    loss_fn = ELBOLoss(beta=0.3).to(torch.bfloat16)
    assert loss_fn.beta == 0.3 and loss_fn._beta.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(likelihood="poisson"), "unknown likelihood"),
        (dict(obs_logvar="learned"), "unknown obs_logvar"),
        (dict(reduction="max"), "unknown reduction"),
        (dict(likelihood="bernoulli", obs_logvar="scalar"), "only"),
        (dict(likelihood="gaussian", obs_logvar="feature"), "event_shape"),
    ],
)
def test_elbo_loss_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ELBOLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss_under_bf16_autocast(backend):
    # The networks run in bf16, the loss in float32 (x's dtype), like torch's own losses.
    torch.manual_seed(0)
    model, loss_fn = VAE(12, 2, hidden=(8,)), ELBOLoss()
    x = torch.bernoulli(torch.full((6, 12), 0.3))
    with vae_fast.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.recon.dtype == torch.bfloat16
        loss, ll, kl = loss_fn(out.recon, x, out.mu, out.logvar)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gaussian_elbo_loss_keeps_its_float32_obs_logvar_under_autocast():
    # Under autocast the loss runs in float32, so the learnable obs_logvar enters as it
    # is (rounded to the decoder's bf16 first, the loss moved by 1e-4 relative).
    torch.manual_seed(0)
    loss_fn = ELBOLoss("gaussian", obs_logvar="feature", reduction="sum", event_shape=(64,))
    with torch.no_grad():
        loss_fn.obs_logvar.copy_(torch.linspace(-6.0, 6.0, 64) + 1e-2)  # not bf16 values
    x, mu, logvar = torch.randn(4, 64), torch.randn(4, 3), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = torch.nn.Linear(3, 64)(torch.randn(4, 3))
        assert recon.dtype == torch.bfloat16
        loss, _, _ = loss_fn(recon, x, mu, logvar)
        kwargs = dict(likelihood="gaussian", obs_logvar=loss_fn.obs_logvar, reduction="sum")
        want, _, _ = vae_fast.elbo(recon, x, mu, logvar, **kwargs)
    assert torch.equal(loss, want)


# --------------------------------------------------------------------------- log-likelihood


def _linear_gaussian(d: int, latent: int, sigma2: float) -> tuple[VAE, ELBOLoss, callable]:
    """A linear-Gaussian VAE whose encoder is the exact posterior: every importance weight
    then equals p(x), so the estimate is exact for any number of samples.

    p(z) = N(0, I), p(x|z) = N(Wz + b, sigma2 I) with orthogonal columns of W, so the
    posterior N(S W^T (x - b) / sigma2, S), S = (I + W^T W / sigma2)^-1, is diagonal;
    p(x) = N(b, W W^T + sigma2 I).
    """
    g = _seeded(3)
    q, _ = torch.linalg.qr(torch.randn(d, latent, generator=g, dtype=torch.float64))
    w = q * torch.linspace(0.5, 2.0, latent, dtype=torch.float64)  # orthogonal columns
    b = torch.randn(d, generator=g, dtype=torch.float64)
    s = 1.0 / (1.0 + (w * w).sum(0) / sigma2)  # diagonal of S
    model = VAE(d, latent, hidden=(), likelihood="gaussian").double()
    with torch.no_grad():
        enc, dec = model.encoder[0], model.decoder[0]
        a = (s[:, None] * w.T) / sigma2  # mu = A (x - b)
        enc.weight.copy_(torch.cat([a, torch.zeros_like(a)]))
        enc.bias.copy_(torch.cat([-(a @ b), s.log()]))
        dec.weight.copy_(w)
        dec.bias.copy_(b)
    loss_fn = ELBOLoss("gaussian", "fixed").double()
    loss_fn.obs_logvar.fill_(math.log(sigma2))  # in fp64: a float32 init would round it
    marginal = MultivariateNormal(b, w @ w.T + sigma2 * torch.eye(d, dtype=torch.float64))
    return model, loss_fn, marginal.log_prob


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_samples", "max_rows"),
    [(1, 1 << 16), (50, 1 << 16), (50, 8)],  # one sample; one chunk; many uneven chunks
)
def test_log_likelihood_is_exact_with_the_true_posterior(backend, num_samples, max_rows):
    model, loss_fn, log_px = _linear_gaussian(d=6, latent=3, sigma2=0.3)
    x = torch.randn(4, 6, generator=_seeded(4), dtype=torch.float64) * 2
    with vae_fast.backend(backend):
        got = model.log_likelihood(
            x, num_samples, obs_logvar=loss_fn.obs_logvar, max_rows=max_rows, generator=_seeded()
        )
    torch.testing.assert_close(got, log_px(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_likelihood_matches_a_direct_computation(backend, reference_draws_like_fused):
    """Bernoulli: the same draws as reparameterize makes, then log-mean-exp in fp64 the long
    way, with torch.distributions. 200 features put log p(x) near -140, where exp underflows
    in float32: the module must stay finite (it works in log space)."""
    torch.manual_seed(1)
    model = VAE(200, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((3, 200), 0.5), generator=_seeded(5))
    k = 64
    with vae_fast.backend(backend):
        got = model.log_likelihood(x, k, generator=_seeded(7))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        _, eps = torch.ops.vae_fast.reparameterize(  # the draw reparameterize makes
            torch.zeros_like(mu), torch.zeros_like(mu), k, generator=_seeded(7)
        )
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = model.decode(z.flatten(0, 1)).reshape(k, 3, 200).double()
        z, mu, sd = z.double(), mu.double(), torch.exp(0.5 * logvar.double())
        log_w = (
            Bernoulli(logits=logits).log_prob(x.double()).sum(-1)
            + Normal(0.0, 1.0).log_prob(z).sum(-1)
            - Normal(mu, sd).log_prob(z).sum(-1)
        )
        shift = log_w.max(0).values  # exp(-140) is fine in fp64 even without the shift
        want = torch.log(torch.exp(log_w - shift).mean(0)) + shift
    assert torch.isfinite(got).all() and (got < -100).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_log_likelihood_tightens_with_more_samples():
    # The estimate is a lower bound whose expectation grows with k (Burda et al.).
    torch.manual_seed(0)
    model = VAE(30, 2, hidden=(16,))
    x = torch.bernoulli(torch.full((64, 30), 0.4), generator=_seeded(2))
    with vae_fast.backend("reference"):
        one = model.log_likelihood(x, 1, generator=_seeded(1)).mean()
        many = model.log_likelihood(x, 200, generator=_seeded(1)).mean()
    assert many > one


def test_importance_log_likelihood_checks_its_arguments():
    x, mu = torch.zeros(2, 3), torch.zeros(2, 1)
    # 2.0 reached range() (a bare TypeError) and True passed as one sample.
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="`num_samples` must be a positive int"):
            importance_log_likelihood(x, mu, mu, lambda z: z, num_samples=bad)
    with pytest.raises(ValueError, match="`max_rows` must be a positive int"):
        importance_log_likelihood(x, mu, mu, lambda z: z, num_samples=1, max_rows=0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        importance_log_likelihood(x, mu, mu, lambda z: z, num_samples=1, likelihood="laplace")


# --------------------------------------------------------------------------- backends


def _loss_and_grads(backend, model, loss_fn, x):
    model.zero_grad(set_to_none=True)
    loss_fn.zero_grad(set_to_none=True)
    with vae_fast.backend(backend):
        out = model(x, generator=_seeded(11))
        loss, ll, kl = loss_fn(out.recon, x, out.mu, out.logvar)
    loss.backward()
    named = [*model.named_parameters(), *loss_fn.named_parameters()]
    return loss.detach(), ll.detach(), kl.detach(), {n: p.grad.clone() for n, p in named}


@pytest.mark.fused_only
@pytest.mark.parametrize(
    ("make", "likelihood", "obs"),
    [
        (lambda: VAE(64, 4, hidden=(32, 16)), "bernoulli", "fixed"),
        (lambda: VAE(64, 4, hidden=(32,), likelihood="gaussian"), "gaussian", "feature"),
        (lambda: ConvVAE((1, 8, 8), 4, channels=(4, 8), hidden=16), "bernoulli", "fixed"),
        (lambda: ConvVAE((1, 8, 8), 4, channels=(4,), likelihood="gaussian"), "gaussian", "scalar"),
    ],
)
def test_fused_and_reference_give_the_same_loss_and_gradients(
    make, likelihood, obs, reference_draws_like_fused
):
    torch.manual_seed(0)
    model = make()
    loss_fn = ELBOLoss(likelihood, obs, beta=0.7, event_shape=(1, 8, 8))
    with torch.no_grad():
        for p in loss_fn.parameters():
            p.uniform_(-1, 1)
    x = torch.rand(33, 1, 8, 8)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    ref = _loss_and_grads("reference", model, loss_fn, x)
    fused = _loss_and_grads("fused", model, loss_fn, x)
    for what, a, b in zip(("loss", "log-likelihood", "kl"), fused[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")
    for name, g in ref[3].items():
        torch.testing.assert_close(
            fused[3][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


@pytest.mark.fused_only
@pytest.mark.parametrize(
    ("make", "likelihood", "obs"),
    [
        (lambda: VAE(64, 4, hidden=(32, 16)), "bernoulli", "fixed"),
        (lambda: ConvVAE((1, 8, 8), 4, channels=(4,), likelihood="gaussian"), "gaussian", "scalar"),
    ],
)
def test_inplace_grad_gives_the_same_gradients(make, likelihood, obs):
    # The models' decoder outputs (Linear / ConvTranspose) are not saved by their
    # producers, so the gradient can be written over them.
    torch.manual_seed(0)
    model = make()
    x = torch.bernoulli(torch.rand(17, 1, 8, 8))
    results = []
    for inplace in (False, True):
        loss_fn = ELBOLoss(likelihood, obs, event_shape=(1, 8, 8), inplace_grad=inplace)
        model.zero_grad()
        results.append(_loss_and_grads("fused", model, loss_fn, x))
    (loss, _, _, grads), (loss_ip, _, _, grads_ip) = results
    assert torch.equal(loss, loss_ip)
    assert grads.keys() == grads_ip.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads_ip[name]), name
    assert "inplace_grad=True" in repr(ELBOLoss(inplace_grad=True))
    # The gradient went over the decoder's output (equal gradients alone would also hold
    # if the option were ignored).
    out = model(x, generator=_seeded(11))
    before = out.recon.detach().clone()
    ELBOLoss(likelihood, obs, event_shape=(1, 8, 8), inplace_grad=True)(
        out.recon, x, out.mu, out.logvar
    )
    assert not torch.equal(out.recon.detach(), before)


@pytest.mark.fused_only
def test_fused_and_reference_give_the_same_log_likelihood(reference_draws_like_fused):
    torch.manual_seed(0)
    model = ConvVAE((1, 8, 8), 3, channels=(4,), hidden=16)
    x = torch.bernoulli(torch.full((9, 1, 8, 8), 0.3), generator=_seeded(2))
    got = {}
    for backend in ("reference", "fused"):
        with vae_fast.backend(backend):
            got[backend] = model.log_likelihood(x, 100, max_rows=256, generator=_seeded(3))
    torch.testing.assert_close(got["fused"], got["reference"], rtol=1e-5, atol=1e-4)


def test_modules_hold_no_hidden_state():
    # Thin modules: parameters, and for ELBOLoss a fixed obs_logvar buffer and beta
    # (a 0-d buffer, so that a compiled loss does not recompile as it changes, kept out
    # of the state dict); nothing else.
    assert [n for n, _ in ELBOLoss().named_buffers()] == ["_beta"]
    assert list(ELBOLoss().state_dict()) == []
    assert [n for n, _ in ELBOLoss("gaussian").named_buffers()] == ["_beta", "obs_logvar"]
    assert isinstance(VAE(4, 1).encoder, nn.Sequential)


# --------------------------------------------------------------------------- module arguments


def test_setting_beta_keeps_a_built_graph_differentiable():
    # A loss built at beta=0.2, the ELBO logged at beta=1, beta set back: the first
    # loss's backward still runs, with its own beta (the setter makes a new tensor).
    g = _seeded(0)
    recon = torch.randn(4, 6, generator=g, requires_grad=True)
    x = torch.rand(4, 6, generator=g).round()
    mu = torch.randn(4, 2, generator=g, requires_grad=True)
    logvar = torch.randn(4, 2, generator=g)
    loss_fn = ELBOLoss(beta=0.2)
    loss = loss_fn(recon, x, mu, logvar)[0]
    loss_fn.beta = 1.0
    with torch.no_grad():
        loss_fn(recon, x, mu, logvar)
    loss_fn.beta = 0.2
    loss.backward()
    want = torch.autograd.grad(vae_fast.elbo(recon, x, mu, logvar, beta=0.2)[0], mu)[0]
    torch.testing.assert_close(mu.grad, want)


def test_elbo_loss_checks_its_arguments():
    x = torch.zeros(2, 3, 4)
    gaussian = ELBOLoss("gaussian", "feature", event_shape=(4,))  # rows are (3, 4)
    with pytest.raises(ValueError, match=r"rows of shape \(3, 4\).*event_shape \(4,\)"):
        gaussian(x, x, torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="`beta` requires grad"):
        ELBOLoss(beta=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(TypeError, match="`beta` must be a number"):
        ELBOLoss(beta="0.5")
    with pytest.raises(ValueError, match="`latent_dim` must be a positive int"):
        VAE(12, 0)
    with pytest.raises(ValueError, match="`in_features` must be a positive int"):
        VAE(12.7, 2)
    # What did work goes on working: numpy numbers, an iterable of widths.
    model = VAE(np.int64(12), np.int64(2), hidden=map(int, "8,4".split(",")))
    assert model.hidden == (8, 4) and model.in_features == 12
    assert ELBOLoss(beta=np.float32(0.5)).beta == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # A float size would be truncated by int() into another model without a word.
        (dict(latent_dim=2.5), "ConvVAE: `latent_dim` must be a positive int"),
        (dict(hidden=0), "ConvVAE: `hidden` must be a positive int"),
        (dict(channels=(8, 0)), "ConvVAE: `channels` must be a positive int"),
        (dict(channels=()), "ConvVAE: `channels` must give at least one conv width"),
        (dict(in_shape=(8, 8)), r"ConvVAE: `in_shape` must be \(C, H, W\)"),
        (dict(in_shape=(1, 0, 8)), "ConvVAE: `in_shape` must be a positive int"),
        (dict(likelihood="poisson"), "ConvVAE: unknown likelihood 'poisson'"),
    ],
)
def test_conv_vae_checks_its_arguments(kwargs, message):
    args = dict(in_shape=(1, 8, 8), latent_dim=2) | kwargs
    with pytest.raises(ValueError, match=message):
        ConvVAE(**args)


def test_conv_vae_takes_numpy_sizes_and_iterables():
    model = ConvVAE(np.array([1, 8, 8]), np.int64(2), channels=map(int, "4,8".split(",")))
    assert (model.in_shape, model.latent_dim, model.channels) == ((1, 8, 8), 2, (4, 8))


F64 = torch.float64


def test_a_float64_loss_under_autocast_stays_float64():
    # Autocast leaves float64 alone: a float32 obs_logvar parameter follows the model.
    g = _seeded(1)
    x, recon = torch.rand(3, 5, generator=g, dtype=F64), torch.rand(3, 5, generator=g, dtype=F64)
    mu, logvar = torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    learnt = ELBOLoss("gaussian", "scalar", init_obs_logvar=0.1)  # a float32 parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = learnt(recon, x, mu, logvar)[0]
    assert loss.dtype == F64
    loss.backward()
    assert learnt.obs_logvar.grad is not None
