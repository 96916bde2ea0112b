"""The importance-weighted bound (IWAE) with its STL and DReG gradient estimators.

    log w_k = log p(x | z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))
    bound   = logsumexp_k(log w_k) - log K               (Burda et al. 2016)

`iwae` is the fused operator ``torch.ops.vae_fast.iwae``: one pass over the K decoder
outputs gives the bound and, with the normalized weights, the gradient of the loss
w.r.t. every input, which backward then only scales (as `vae_fast.elbo` does). x, mu
and logvar carry no sample dim and are read by every sample inside the kernel, never
repeated in memory. `vae_fast.reference.iwae` (here also `reference_iwae`) is the same
function in plain torch (with torch.logsumexp): `vae_fast.backend("reference")` and
recorded backwards (create_graph, torch.func) run it.

The three estimators differ only in their gradients (the loss is the same):

- ``"iwae"``: the gradient of the bound.
- ``"stl"`` (sticking the landing, Roeder et al. 2017): log q's direct dependence on
  (mu, logvar), the score term, is dropped: log q is evaluated at stop-gradient
  (mu, logvar). The encoder still gets the path gradient through z = mu + sigma*eps,
  which autograd follows through z.
- ``"dreg"`` (doubly reparameterized, Tucker et al. 2019): as "stl", and the gradient
  reaching z, the direct one and the one arriving through the decoder, is weighted by
  the squared normalized weights w~_k^2 instead of w~_k; the decoder keeps w~_k. The
  op cannot reach the decoder's path, so the reweighting is done by the backward of
  `iwae_sample`, which drew z: `iwae` leaves the normalized weights on z's sampler,
  and `iwae(estimator="dreg")` raises a ValueError unless z came from `iwae_sample`.
"""

from __future__ import annotations

import torch

from vae_fast import _autograd, reference
from vae_fast import _validate as V
from vae_fast._dreg import dreg_slot, iwae_sample
from vae_fast._extension import ops, public, register_op

# An alias of vae_fast.reference.iwae, the plain-torch iwae.
reference_iwae = reference.iwae
__all__ = ["iwae", "iwae_sample", "reference_iwae"]


# --------------------------------------------------------------------------- public function


def iwae(
    recon: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    estimator: str = "iwae",
    reduction: str = "mean",
    validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative importance-weighted bound of K samples (Burda et al. 2016).

    log w_k = log p(x | z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar)), and the
    bound logsumexp_k(log w_k) - log K is computed max-shifted in float64 (exact for log
    weights spread over 1e4 and more). Its gradient w.r.t. recon is computed in the same
    pass, with the normalized weights w~_k = softmax_k(log w_k).

    With K = 1 and estimator "iwae" this is the ELBO with a *sampled* KL term,
    log q(z|x) - log p(z) at the drawn z; `vae_fast.elbo` uses the analytic KL instead
    (same expectation, lower variance), so the two differ by the KL's sampling noise.

    Args:
        recon: the decoder's output for the K samples, shape (K, *x.shape): logits for
            ``likelihood="bernoulli"``, means for ``"gaussian"``.
        x: data, shape (B, ...); broadcast over the samples (never repeated in memory).
        z: the K samples, shape (K, *mu.shape). For "iwae" and "stl" any z works,
            e.g. ``mu + torch.exp(0.5 * logvar) * eps`` built by hand; for "dreg" it
            must be the output of `vae_fast.iwae_sample` (see there).
        mu, logvar: the encoder's diagonal Gaussian q(z|x), shape (B, ...).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        obs_logvar: the Gaussian observation log-variance, broadcastable to recon:
            scalar, per feature, per data element (shared by the samples) or per
            element of recon; None means 0.
        estimator: the gradient estimator: ``"iwae"`` (the bound's gradient), ``"stl"``
            (no score term: mu and logvar get gradients only through z) or ``"dreg"``
            (STL with the gradient through z weighted by w~_k^2; the decoder keeps
            w~_k). The loss and log weights are the same for all three.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
        validate_args: for the Bernoulli likelihood, raise a ValueError if a target
            lies outside [0, 1]. None follows `vae_fast.set_default_validate_args`.

    Returns:
        ``(loss, log_weights)``: loss is -bound reduced (shape () or (B,)), in x's dtype;
        log_weights has shape (K, B) in the accumulation dtype (float32 for half
        inputs: its differences are exponentiated). Both are differentiable; a
        backward with create_graph=True (or torch.func) differentiates the reference.
    """
    V.check_option(V.IWAE_FN, "estimator", estimator, V.ESTIMATORS)
    # Looked up before autocast may replace z by a float32 copy.
    slot = dreg_slot(z, mu, logvar) if estimator == "dreg" else None
    loss, log_weights = _iwae(
        recon,
        x,
        z,
        mu,
        logvar,
        likelihood=likelihood,
        obs_logvar=obs_logvar,
        estimator=estimator,
        reduction=reduction,
        validate_args=validate_args,
    )
    if slot is not None and torch.is_grad_enabled() and z.requires_grad:
        slot.weights = torch.softmax(log_weights.detach(), dim=0)
    return loss, log_weights


@public(reference.iwae)
def _iwae(
    recon: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    estimator: str = "iwae",
    reduction: str = "mean",
    validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    V.check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
    validate = V.resolve_validate_args(V.IWAE_FN, validate_args)
    inputs = (x, recon, z, mu, logvar, obs_logvar)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    loss, log_weights, *_ = ops.iwae(
        x, recon, z, mu, logvar, obs_logvar, likelihood, estimator, reduction, wants_grad, validate
    )
    return loss, log_weights


# --------------------------------------------------------------------------- fake and autograd


def _fake_iwae(
    x,
    recon,
    z,
    mu,
    logvar,
    obs_logvar,
    likelihood,
    estimator,
    reduction,
    compute_grad,
    validate_x=True,
):
    V.check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
    samples, batch = recon.shape[0], x.shape[0]
    score = compute_grad and estimator == "iwae"
    with_obs = compute_grad and obs_logvar is not None

    def empty():
        return x.new_empty((0,))

    return (
        x.new_empty((batch,) if reduction == "none" else ()),
        x.new_empty((samples, batch), dtype=V.opmath_dtype(x.dtype)),
        x.new_empty(recon.shape) if compute_grad else empty(),
        x.new_empty(z.shape) if compute_grad else empty(),
        x.new_empty(mu.shape) if score else empty(),
        x.new_empty(mu.shape) if score else empty(),
        x.new_empty(obs_logvar.shape) if with_obs else empty(),
    )


def _setup_iwae(ctx, inputs, output):
    x, recon, z, mu, logvar, obs_logvar, likelihood, estimator, reduction, compute_grad, _ = inputs
    _, _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, recon, z, mu, logvar, obs_logvar, *grads)
    ctx.likelihood, ctx.estimator, ctx.reduction = likelihood, estimator, reduction
    ctx.has_fused_grads = compute_grad


def _reference_of(ctx):
    """The reference as a function of the op's six differentiable inputs."""

    def loss_and_log_weights(x, recon, z, mu, logvar, obs_logvar):
        return reference.iwae(
            recon,
            x,
            z,
            mu,
            logvar,
            likelihood=ctx.likelihood,
            obs_logvar=obs_logvar,
            estimator=ctx.estimator,
            reduction=ctx.reduction,
            validate_args=False,
        )

    return loss_and_log_weights


def _backward_iwae(ctx, grad_loss, grad_log_weights, *_):
    x, recon, z, mu, logvar, obs_logvar, *fused = ctx.saved_tensors
    needs = ctx.needs_input_grad[:6]
    no_grads = (None,) * 5  # likelihood, estimator, reduction, compute_grad, validate_x
    per_row = ctx.reduction == "none"
    # The saved gradients serve the usual call: only the loss has a gradient, x needs
    # none and (with reduction="none") obs_logvar needs none, its being a sum over rows.
    saved_serve = (
        ctx.has_fused_grads
        and grad_log_weights is None
        and not needs[0]
        and not (per_row and needs[5])
    )
    if torch.is_grad_enabled() or not saved_serve:
        # A recorded backward (create_graph, torch.func) or a rare one: the reference's.
        inputs = (x, recon, z, mu, logvar, obs_logvar)
        grads = _autograd.reference_vjp(
            _reference_of(ctx), inputs, needs, (grad_loss, grad_log_weights)
        )
        return (*grads, *no_grads)
    if grad_loss is None:
        return (None,) * 6 + no_grads
    g_recon, g_z, g_mu, g_lv, g_obs = fused
    score = ctx.estimator == "iwae"
    wanted = (
        g_recon if needs[1] else None,
        g_z if needs[2] else None,
        g_mu if needs[3] and score else None,
        g_lv if needs[4] and score else None,
        g_obs if needs[5] else None,
    )
    scale_shapes = None
    if per_row:  # (B,) against (K, B, ...) for recon and z, (B, ...) for mu, logvar, obs
        scale_shapes = [_row_scale_shape(g, 1 if i < 2 else 0) for i, g in enumerate(wanted)]
    return (None, *_autograd.hand_back(wanted, grad_loss, scale_shapes), *no_grads)


def _row_scale_shape(g: torch.Tensor | None, lead: int) -> tuple[int, ...] | None:
    """The shape that makes a per-row (B,) grad_output broadcast against g, whose batch
    dim is at `lead`."""
    if g is None:
        return None
    return (1,) * lead + (g.shape[lead],) + (1,) * (g.dim() - lead - 1)


register_op("iwae", _fake_iwae, _setup_iwae, _backward_iwae, autocast=True)
