"""vae_fast.elbo(..., inplace_grad=True): d(loss)/d(recon) written over recon itself.

The same kernel as the default path, so values and every gradient must be equal
bit for bit; what changes is where d(loss)/d(recon) lives (recon's own storage)
and what is refused (inputs whose values autograd still needs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, make

import vae_fast

B, D, H, Z = 6, 11, 5, 3


def _model(dtype, device, likelihood, gen):
    """A decoder weight, its input, the encoder outputs and the data."""
    kind = "binary" if likelihood == "bernoulli" else "normal"
    x = make((B, D), dtype, device, kind=kind, low=0.0, high=1.0, gen=gen)
    weight = make((H, D), dtype, device, kind="normal", gen=gen).requires_grad_()
    hidden = make((B, H), dtype, device, kind="normal", gen=gen)
    mu = make((B, Z), dtype, device, kind="normal", gen=gen).requires_grad_()
    logvar = make((B, Z), dtype, device, low=-2.0, high=2.0, gen=gen).requires_grad_()
    obs = None
    if likelihood == "gaussian":
        obs = make((D,), dtype, device, low=-0.5, high=0.5, gen=gen).requires_grad_()
    return x, weight, hidden, mu, logvar, obs


def _step(model, likelihood, reduction, inplace, grad_scale):
    x, weight, hidden, mu, logvar, obs = model
    leaves = [t for t in (weight, mu, logvar, obs) if t is not None]
    for t in leaves:
        t.grad = None
    recon = hidden @ weight  # a non-leaf whose producer (mm) does not save it
    seen = []
    recon.register_hook(lambda g: seen.append(g))
    loss, ll, kl = vae_fast.elbo(
        recon,
        x,
        mu,
        logvar,
        likelihood=likelihood,
        obs_logvar=obs,
        reduction=reduction,
        inplace_grad=inplace,
    )
    (loss * grad_scale if grad_scale != 1 else loss).backward()
    return recon, seen[0], (loss, ll, kl), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_scale", [1.0, 2.5])
def test_equals_the_default_path(device, dtype, likelihood, reduction, grad_scale, gen):
    model = _model(dtype, device, likelihood, gen)
    _, g_default, outs_default, grads_default = _step(
        model, likelihood, reduction, False, grad_scale
    )
    recon, g_inplace, outs_inplace, grads_inplace = _step(
        model, likelihood, reduction, True, grad_scale
    )
    for a, b in zip(outs_default, outs_inplace, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_default, g_inplace)
    for a, b in zip(grads_default, grads_inplace, strict=True):
        assert torch.equal(a, b)
    # The gradient handed to the decoder is recon's own storage, now holding it.
    assert g_inplace.data_ptr() == recon.data_ptr()
    assert torch.equal(recon, g_default)


@pytest.mark.parametrize("device", DEVICES)
def test_a_second_scaled_backward_through_a_retained_graph(device, gen):
    # With the graph retained the gradients come back as copies (scaled out of place),
    # so a second backward reads the saved ones unchanged, even after the caller
    # clipped the first ones in place; without it they are scaled in place (no copy).
    x, weight, hidden, mu, logvar, _ = _model(torch.float32, device, "bernoulli", gen)
    loss, _, _ = vae_fast.elbo(hidden @ weight, x, mu, logvar, inplace_grad=True)
    first = torch.autograd.grad(2.5 * loss, [weight, mu, logvar], retain_graph=True)
    want = [g.clone() for g in first]
    for g in first:
        g.clamp_(-1e-9, 1e-9)
    second = torch.autograd.grad(2.5 * loss, [weight, mu, logvar])
    for a, b in zip(second, want):
        assert torch.equal(a, b)


def test_create_graph_raises(gen):
    x, weight, hidden, mu, logvar, _ = _model(torch.float32, "cpu", "bernoulli", gen)
    loss, _, _ = vae_fast.elbo(hidden @ weight, x, mu, logvar, inplace_grad=True)
    with pytest.raises(RuntimeError, match="inplace_grad=True. cannot be differentiated twice"):
        torch.autograd.grad(loss, [weight], create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_log_likelihood_and_kl_are_detached(device, gen):
    x, weight, hidden, mu, logvar, _ = _model(torch.float32, device, "bernoulli", gen)
    loss, ll, kl = vae_fast.elbo(hidden @ weight, x, mu, logvar, inplace_grad=True)
    assert loss.requires_grad and not ll.requires_grad and not kl.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_without_grad_recon_is_untouched(device, gen):
    x, weight, hidden, mu, logvar, _ = _model(torch.float32, device, "bernoulli", gen)
    with torch.no_grad():
        recon = hidden @ weight
        before = recon.clone()
        vae_fast.elbo(recon, x, mu, logvar, inplace_grad=True)
    assert torch.equal(recon, before)


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("device", DEVICES)
def test_under_compile_it_matches_eager(device, gen):
    x, weight, hidden, mu, logvar, _ = _model(torch.float32, device, "bernoulli", gen)

    def loss_fn(weight, mu, logvar):
        return vae_fast.elbo(hidden @ weight, x, mu, logvar, inplace_grad=True)[0]

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = torch.autograd.grad(compiled(weight, mu, logvar), [weight, mu, logvar])
    want = torch.autograd.grad(loss_fn(weight, mu, logvar), [weight, mu, logvar])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- refusals


def _inputs(device, gen):
    return _model(torch.float32, device, "bernoulli", gen)


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_a_leaf(device, gen):
    x, _, _, mu, logvar, _ = _inputs(device, gen)
    recon = torch.zeros(B, D, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"inplace_grad=True\): `recon` is a leaf"):
        vae_fast.elbo(recon, x, mu, logvar, inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_a_recon_its_producer_saved(device, gen):
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    with pytest.raises(ValueError, match=r"saved by SigmoidBackward0"):
        vae_fast.elbo(torch.sigmoid(hidden @ weight), x, mu, logvar, inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_saved_tensor_behind_a_view_fails_at_backward(device, gen):
    # Not visible from recon's own grad_fn (a view); autograd's version check catches
    # it because the op bumps recon's version.
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    recon = torch.sigmoid(hidden @ weight).view(B, D)
    loss, _, _ = vae_fast.elbo(recon, x, mu, logvar, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_reduction_none(device, gen):
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    with pytest.raises(ValueError, match=r"needs reduction 'mean' or 'sum'"):
        vae_fast.elbo(hidden @ weight, x, mu, logvar, reduction="none", inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_non_contiguous_recon(device, gen):
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    recon = (weight.t() @ hidden.t()).t()  # (B, D) with transposed strides
    with pytest.raises(ValueError, match=r"must be contiguous; got shape \(6, 11\)"):
        vae_fast.elbo(recon, x, mu, logvar, inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_x_that_requires_grad(device, gen):
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    with pytest.raises(ValueError, match=r"`x` requires grad"):
        vae_fast.elbo(hidden @ weight, x.requires_grad_(), mu, logvar, inplace_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_itself_checks_layout(device, gen):
    # Direct torch.ops calls (and the fake kernel under compile) check it too.
    x, weight, hidden, mu, logvar, _ = _inputs(device, gen)
    recon = (hidden @ weight).detach().t().contiguous().t()
    with pytest.raises(ValueError, match="must be contiguous"):
        torch.ops.vae_fast._elbo_into_recon(
            x, recon, mu.detach(), logvar.detach(), None, "bernoulli", torch.tensor(1.0), "mean"
        )


@pytest.mark.fused_only
@pytest.mark.parametrize("device", DEVICES)
def test_the_op_refuses_inputs_that_share_recons_memory(device):
    # The gradient is written over recon while x, mu, logvar are read: an input that is
    # (part of) recon would be read half overwritten, differently from run to run.
    recon = torch.randn(3, 4, 6, device=device)  # K = 3 samples of (4, 6)
    mu = torch.randn(4, 6, device=device)
    beta = torch.tensor(1.0, device=device)
    op = torch.ops.vae_fast._elbo_into_recon
    with pytest.raises(ValueError, match="`x` shares memory with `recon`"):
        op(recon[0], recon, mu, mu.clone(), None, "gaussian", beta, "sum")
    flat = recon[0]
    with pytest.raises(ValueError, match="`mu` shares memory with `recon`"):
        op(torch.randn(4, 6, device=device), flat, flat, mu, None, "gaussian", beta, "sum")


def _into_recon(x, recon, mu, logvar):
    beta = torch.tensor(1.0)
    return torch.ops.vae_fast._elbo_into_recon(x, recon, mu, logvar, None, "bernoulli", beta, "sum")


@pytest.mark.fused_only
def test_the_op_bumps_recons_version_when_autograd_does_not_record_it(gen):
    # A direct call with nothing requiring grad still writes over recon: a backward that
    # saved recon elsewhere must raise, as after torch's own in-place ops, not read the
    # gradient as if it were recon.
    x, weight, hidden, mu, logvar, _ = _inputs("cpu", gen)
    recon = (hidden @ weight).detach()
    w = torch.ones_like(recon, requires_grad=True)
    saved_recon = (w * recon).sum()  # mul saves recon for d/dw
    _into_recon(x, recon, mu.detach(), logvar.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_recon.backward()


@pytest.mark.fused_only
def test_the_op_bumps_recons_version_when_it_raises_after_writing(gen):
    # Targets outside [0, 1] are found in the pass that writes recon over: the error
    # comes after the write, and a backward that saved recon must still refuse it.
    x, weight, hidden, mu, logvar, _ = _inputs("cpu", gen)
    recon = (hidden @ weight).detach()
    w = torch.ones_like(recon, requires_grad=True)
    saved_recon = (w * recon).sum()
    with pytest.raises(ValueError, match="outside"):
        _into_recon(x * 3, recon, mu.detach(), logvar.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_recon.backward()


@pytest.mark.fused_only
def test_the_op_takes_a_plain_recon_and_traced_tensors(gen):
    # A recon that needs no gradient (only mu and logvar do) may be written over; and a
    # traced call (meta tensors, as under torch.compile) has no storage to inspect.
    x, weight, hidden, mu, logvar, _ = _inputs("cpu", gen)
    loss = _into_recon(x, (hidden @ weight).detach(), mu, logvar)[0]
    loss.backward()
    assert mu.grad is not None and logvar.grad is not None
    meta = hidden.to("meta") @ weight.to("meta")
    out = _into_recon(x.to("meta"), meta, mu.to("meta"), logvar.to("meta"))
    assert out[0].device.type == "meta"


@pytest.mark.fused_only
def test_the_op_refuses_what_torchs_in_place_ops_refuse(gen):
    x, weight, hidden, mu, logvar, _ = _inputs("cpu", gen)
    mu, logvar = mu.detach(), logvar.detach()
    # A recorded call: x would get no gradient (recon's values are gone), and a leaf
    # that requires grad would lose its values to its own gradient.
    with pytest.raises(ValueError, match="`x` requires grad"):
        _into_recon(x.clone().requires_grad_(), hidden @ weight, mu, logvar)
    with pytest.raises(ValueError, match="`recon` is a leaf"):
        _into_recon(x, torch.zeros(B, D, requires_grad=True), mu, logvar)
    # A lazily negated view (ATen's fallback would copy it and assert) and an inference
    # tensor outside inference mode.
    negated = torch.randn(B, D, dtype=torch.complex64).conj().imag
    assert negated.is_neg()
    with pytest.raises(ValueError, match="`recon` is a lazily negated or conjugated view"):
        _into_recon(x, negated, mu, logvar)
    with torch.inference_mode():
        frozen = torch.randn(B, D)
    with pytest.raises(RuntimeError, match="`recon` is an inference tensor"):
        _into_recon(x, frozen, mu, logvar)
