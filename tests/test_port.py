"""The pytorch/examples VAE (vae/main.py), ported to vae_fast as the README shows.

The original model and `loss_function(recon_x, x, mu, logvar)` (BCE on sigmoid
probabilities, summed, plus the analytic KL) against the port: the decoder returns
logits, and the loss is ``vae_fast.elbo(logits, x, mu, logvar, reduction="sum")[0]``.
Both runs start from the same weights and use the same eps (drawn with torch.randn and
passed to ``reparameterize(..., eps=...)``), so their per-epoch losses must agree.
Run on scikit-learn's bundled digits (8x8), scaled to [0, 1], for three epochs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vae_fast

sklearn_datasets = pytest.importorskip("sklearn.datasets")


class ExamplesVAE(nn.Module):
    """pytorch/examples' VAE, with 64 inputs (8x8 digits) instead of 784."""

    def __init__(self, features: int = 64, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, features)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode_logits(self, z):
        return self.fc4(F.relu(self.fc3(z)))

    def forward_original(self, x, eps):
        mu, logvar = self.encode(x)
        z = mu + eps * torch.exp(0.5 * logvar)  # the example's reparameterize
        return torch.sigmoid(self.decode_logits(z)), mu, logvar

    def forward_ported(self, x, eps):
        mu, logvar = self.encode(x)
        z = vae_fast.reparameterize(mu, logvar, eps=eps)
        return self.decode_logits(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """pytorch/examples' loss, verbatim (but for the 64 features)."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def _train(model, data, eps, ported: bool, epochs: int = 3, batch: int = 128) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for i, start in enumerate(range(0, len(data), batch)):
            x = data[start : start + batch]
            e = eps[epoch][i][: len(x)]
            optimizer.zero_grad()
            if ported:
                logits, mu, logvar = model.forward_ported(x, e)
                loss = vae_fast.elbo(logits, x, mu, logvar, reduction="sum")[0]
            else:
                recon_batch, mu, logvar = model.forward_original(x, e)
                loss = loss_function(recon_batch, x, mu, logvar)
            loss.backward()
            total += loss.item()
            optimizer.step()
        losses.append(total / len(data))
    return losses


@pytest.mark.slow
def test_the_ported_example_trains_as_the_original():
    digits = sklearn_datasets.load_digits()
    data = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [0, 1] intensities
    torch.manual_seed(0)
    original = ExamplesVAE()
    ported = copy.deepcopy(original)
    g = torch.Generator().manual_seed(1)
    batches = (len(data) + 127) // 128
    eps = [[torch.randn(128, 20, generator=g, dtype=torch.float32) for _ in range(batches)]]
    eps = eps * 3
    want = _train(original, data, eps, ported=False)
    got = _train(ported, data, eps, ported=True)
    assert want[-1] < want[0]  # it trains
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)
