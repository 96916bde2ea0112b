"""The training command's objectives: --bound elbo|iwae, --num-samples K, --estimator.

Each test is one promise: what the objective computes (the very numbers of the public
functions on the same draw), that a run trains and says what it chose, that options
that cannot go together are one-line usage errors, and that --resume refuses a
checkpoint of another objective.
"""

from __future__ import annotations

import json

import pytest
import torch

import vae_fast
from vae_fast.nn import VAE, ELBOLoss
from vae_fast.train import run
from vae_fast.train.objective import Objective

SMALL = ["--latent-dim", "4", "--hidden", "32,16", "--batch-size", "32", "--no-progress",
         "--threads", "1", "--eval-samples", "0"]  # fmt: skip


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        run(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_iwae_objective_is_vae_fast_iwae_on_the_same_draw(estimator):
    # The objective's loss and gradients are those of iwae_sample + decode + iwae,
    # written out by hand with the same generator seed.
    torch.manual_seed(0)
    model, x, k = VAE(12, 3, hidden=(8,)), torch.rand(5, 12).round(), 4
    objective = Objective(model, ELBOLoss(), bound="iwae", num_samples=k, estimator=estimator)
    loss, log_w, _ = objective(x, torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    mu, logvar = model.encode(x)
    z = vae_fast.iwae_sample(mu, logvar, k, generator=torch.Generator().manual_seed(7))
    recon = model.decode(z.flatten(0, 1)).reshape(k, *x.shape)
    want, want_w = vae_fast.iwae(recon, x, z, mu, logvar, estimator=estimator)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert torch.equal(loss, want) and torch.equal(log_w, want_w)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_multi_sample_elbo_objective_is_elbo_with_num_samples():
    # --bound elbo --num-samples K: K draws decoded, the fused multi-sample ELBO.
    torch.manual_seed(0)
    model, x, k = VAE(12, 3, hidden=(8,)), torch.rand(5, 12).round(), 3
    objective = Objective(model, ELBOLoss(), bound="elbo", num_samples=k)
    loss, _, _ = objective(x, torch.Generator().manual_seed(7))
    mu, logvar = model.encode(x)
    z = vae_fast.reparameterize(
        mu, logvar, num_samples=k, generator=torch.Generator().manual_seed(7)
    )
    recon = model.decode(z.flatten(0, 1)).reshape(k, *x.shape)
    assert torch.equal(loss, vae_fast.elbo(recon, x, mu, logvar, num_samples=k)[0])


def test_an_iwae_run_trains_and_says_so(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--bound", "iwae", "--num-samples", "3",
            "--estimator", "dreg", "--epochs", "2", *SMALL]  # fmt: skip
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    assert "objective iwae K=3 (dreg gradients)" in out.splitlines()[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 < r["train_loss"] < 100 for r in records)  # nats per digit: finite, sane


@pytest.mark.parametrize(
    "argv, message",
    [
        # an estimator is a property of the importance-weighted bound's gradient
        (["--estimator", "stl"], "--estimator stl applies to --bound iwae only"),
        # the bound has no KL term to weight or ramp
        (["--bound", "iwae", "--beta", "0.5"], "--bound iwae has no KL term"),
        (["--bound", "iwae", "--kl-warmup-steps", "10"], "--bound iwae has no KL term"),
        (["--bound", "iwae", "--inplace-grad"], "--inplace-grad applies to --bound elbo"),
        # DReG hands its weights over at run time, which a compiled graph cannot do
        (["--bound", "iwae", "--estimator", "dreg", "--compile"], "cannot run under --compile"),
        (["--num-samples", "0"], "must be positive"),
    ],
)
def test_options_that_cannot_go_together_are_one_line_errors(capsys, argv, message):
    code, _, err = cli(capsys, *argv, *SMALL)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err


def test_resume_refuses_another_objective(tmp_path, capsys):
    base = ["--out", str(tmp_path), "--epochs", "2", "--stop-after", "1", *SMALL]
    assert cli(capsys, *base)[0] == 0
    code, _, err = cli(capsys, *base, "--resume", "--bound", "iwae", "--num-samples", "2")
    assert code == 2 and "--bound" in err
