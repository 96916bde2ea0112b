"""float32 accuracy where sums are long or terms are tiny, against float64.

- Rows of millions of elements (volumes, audio) and a shared log-variance whose
  gradient sums millions of terms: the kernels accumulate in blocks, so the error
  does not grow with the length (bar: 2e-6 relative).
- A near-perfect decoder (logits around +-20, row losses ~0.005 nats): the Bernoulli
  term is formed as (x - [l >= 0])*l - log1p(exp(-|l|)), so log1p's tiny value is
  not lost in l + log1p(...) rounding back to l (bar: 1e-6 relative per row).
"""

from __future__ import annotations

import pytest
import torch

import vae_fast

pytestmark = pytest.mark.fused_only  # the reference in float64 is the ground truth


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want) / want).abs().max())


def _reference(fn, *args, **kwargs):
    with vae_fast.backend("reference"):
        return fn(*(a.double() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def test_long_rows(g):
    n = 3_000_000
    x, m, lv = (torch.randn(1, n, generator=g) for _ in range(3))
    x01 = torch.rand(1, n, generator=g).round()
    cases = {
        "gaussian_log_prob": (vae_fast.gaussian_log_prob, (x, m, lv[0, 0])),
        "bernoulli_log_prob": (vae_fast.bernoulli_log_prob, (x01, 3 * m)),
        "gaussian_kl": (vae_fast.gaussian_kl, (m, lv)),
    }
    for name, (fn, args) in cases.items():
        assert _rel(fn(*args), _reference(fn, *args)) < 2e-6, name


@pytest.mark.parametrize("shape", [(1, 3_000_000), (2_000_000, 1)])
def test_shared_logvar_gradient_over_millions_of_terms(g, shape):
    x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lv = torch.tensor(0.3, requires_grad=True)
    (got,) = torch.autograd.grad(vae_fast.gaussian_log_prob(x, m, lv).sum(), lv)
    lv64 = lv.detach().double().requires_grad_()
    with vae_fast.backend("reference"):
        (want,) = torch.autograd.grad(
            vae_fast.gaussian_log_prob(x.double(), m.double(), lv64).sum(), lv64
        )
    assert _rel(got, want) < 2e-6


def test_near_perfect_decoder(g):
    x = torch.rand(64, 784, generator=g).round()
    logits = (2 * x - 1) * (18 + 4 * torch.rand(64, 784, generator=g))
    mu = torch.zeros(64, 2)
    _, got, _ = vae_fast.elbo(logits, x, mu, mu, reduction="none")
    want = _reference(vae_fast.bernoulli_log_prob, x, logits)
    assert want.abs().max() < 0.05  # tiny row losses: the regime under test
    assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_streamed_gradients(g, likelihood):
    # Gradients of 8 MiB and more are written with non-temporal stores, a full vector at
    # a time where the address is aligned. 1031 columns: rows start at every alignment,
    # so aligned (streamed) rows, unaligned ones and each row's tail all occur. Each
    # gradient must equal the float64 reference's (elementwise 1e-6 where not tiny).
    B, D, Z = 2100, 1031, 1024  # recon's gradient 8.7 MB, mu's and logvar's 8.6 MB
    x = torch.rand(B, D, generator=g)
    if likelihood == "bernoulli":
        x = x.round()
    recon = (3 * torch.randn(B, D, generator=g)).requires_grad_()
    mu = torch.randn(B, Z, generator=g).requires_grad_()
    logvar = torch.randn(B, Z, generator=g).requires_grad_()
    kw = {"likelihood": likelihood}
    got = torch.autograd.grad(vae_fast.elbo(recon, x, mu, logvar, **kw)[0], [recon, mu, logvar])
    leaves64 = [t.detach().double().requires_grad_() for t in (recon, mu, logvar)]
    with vae_fast.backend("reference"):
        loss = vae_fast.elbo(leaves64[0], x.double(), *leaves64[1:], **kw)[0]
    want = torch.autograd.grad(loss, leaves64)
    for name, a, b in zip(("recon", "mu", "logvar"), got, want):
        big = b.abs() > 1e-30
        assert float(((a.double() - b) / b)[big].abs().max()) < 1e-6, name


@pytest.mark.parametrize("shape", [(64, 784), (1, 3_000_000)])
def test_one_logit_magnitude_along_the_rows(shape):
    # Every logit at |l| = 12, matching x: each update of the running product of the
    # log1p terms rounds the same way, so the error grows with the block's length
    # (1.3-2.5e-6 with blocks of 64 vectors); rows of MNIST's size and of millions.
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).round()
    logits = (2 * x - 1) * 12
    got = vae_fast.bernoulli_log_prob(x, logits)
    assert _rel(got, _reference(vae_fast.bernoulli_log_prob, x, logits)) < 1e-6
