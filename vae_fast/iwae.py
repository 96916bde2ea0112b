"""The importance-weighted bound (IWAE) with its STL and DReG gradient estimators.

    log w_k = log p(x | z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))
    bound   = logsumexp_k(log w_k) - log K               (Burda et al. 2016)

`iwae` is the fused operator ``torch.ops.vae_fast.iwae``: one pass over the K decoder
outputs gives the bound and, with the normalized weights, the gradient of the loss
w.r.t. every input, which backward then only scales (as `vae_fast.elbo` does). x, mu
and logvar carry no sample dim and are read by every sample inside the kernel, never
repeated in memory. `reference_iwae` is the same function in plain torch (with
torch.logsumexp), used by `vae_fast.backend("reference")`, by recorded backwards
(create_graph, torch.func) and by the tests.

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

import math
import weakref

import torch

from vae_fast import _autograd, reference
from vae_fast import _validate as V
from vae_fast import _random
from vae_fast.ops import _LOAD_ERROR, _ops, _public, reparameterize

ESTIMATORS = ("iwae", "stl", "dreg")
_FN = "vae_fast.iwae"
_SAMPLE_FN = "vae_fast.iwae_sample"
# The attribute by which a z drawn by `iwae_sample` names the slot its backward reads.
_SLOT = "_vae_fast_iwae_slot"


# --------------------------------------------------------------------------- checks


def check_iwae(
    recon: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    obs_logvar: torch.Tensor | None,
    estimator: str,
    reduction: str,
) -> None:
    """The checks of csrc/common/iwae_checks.h, with the same messages."""
    V.check_option(_FN, "likelihood", likelihood, V.LIKELIHOODS)
    V.check_option(_FN, "estimator", estimator, ESTIMATORS)
    V.check_option(_FN, "reduction", reduction, V.REDUCTIONS)
    V.check_tensors(_FN, x=x, recon=recon, z=z, mu=mu, logvar=logvar, obs_logvar=obs_logvar)
    V.check_same_batch(_FN, x, mu)
    if recon.dim() != x.dim() + 1 or recon.shape[1:] != x.shape:
        raise ValueError(
            f"{_FN}: `recon` has shape {tuple(recon.shape)}; expected (K, *x.shape) for x of "
            f"shape {tuple(x.shape)} (K samples of the decoder's output)"
        )
    V.check_same_shape(_FN, "mu", mu, "logvar", logvar)
    if z.dim() != mu.dim() + 1 or z.shape[1:] != mu.shape:
        raise ValueError(
            f"{_FN}: `z` has shape {tuple(z.shape)}; expected (K, *mu.shape) for mu of shape "
            f"{tuple(mu.shape)}"
        )
    if z.shape[0] != recon.shape[0]:
        raise ValueError(
            f"{_FN}: `z` has {z.shape[0]} samples but `recon` has {recon.shape[0]}; "
            "the first dims must match"
        )
    if recon.shape[0] < 1:
        raise ValueError(f"{_FN}: needs at least one sample (K >= 1)")
    V.check_obs_logvar(_FN, obs_logvar, likelihood, "recon", recon.shape)


# --------------------------------------------------------------------------- reference


def reference_iwae(
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
    """`iwae` in plain torch: (loss, log_weights), with the op's own gradients.

    For "stl" and "dreg" log q is evaluated at stop-gradient (mu, logvar). The DReG
    reweighting of the path through z is not part of this function (nor of the op):
    `iwae` records it for `iwae_sample`'s backward, on either backend.
    """
    check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
    if likelihood == "bernoulli" and V.resolve_validate_args(validate_args):
        V.check_targets_in_unit_interval(_FN, x)
    opmath = V.opmath_dtype(x.dtype)
    xf, rf, zf, muf, lvf = (t.to(opmath) for t in (x, recon, z, mu, logvar))
    event_dims = x.dim() - 1
    # x broadcast over the samples: a view, as the op reads it.
    x_k = xf.expand(rf.shape)
    if likelihood == "bernoulli":
        ll = reference.bernoulli_log_prob(x_k, rf, event_dims=event_dims, validate_args=False)
    else:
        obs = obs_logvar.to(opmath) if obs_logvar is not None else xf.new_zeros(())
        ll = reference.gaussian_log_prob(x_k, rf, obs, event_dims=event_dims)
    if estimator != "iwae":  # STL / DReG: no score term
        muf, lvf = muf.detach(), lvf.detach()
    # log N(z; 0, I) - log N(z; mu, exp(logvar)); log 2pi cancels.
    latent = 0.5 * (lvf + (zf - muf).square() * torch.exp(-lvf) - zf.square())
    if latent.dim() > 2:
        latent = latent.sum(dim=tuple(range(2, latent.dim())))
    log_weights = ll + latent
    bound = torch.logsumexp(log_weights, dim=0) - math.log(recon.shape[0])
    per_row = -bound
    if reduction == "mean":
        loss = per_row.mean()
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row
    return loss.to(x.dtype), log_weights


# --------------------------------------------------------------------------- DReG's sampler


class _DRegSlot:
    """What `iwae(estimator="dreg")` leaves for the backward of the `iwae_sample` call
    that drew z: the normalized weights (K, B), and which (mu, logvar) z came from."""

    __slots__ = ("mu", "logvar", "weights")

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu = weakref.ref(mu)
        self.logvar = weakref.ref(logvar)
        self.weights: torch.Tensor | None = None


class _IWAESample(torch.autograd.Function):
    """z = mu + exp(logvar/2) * eps, whose backward multiplies the gradient arriving at z
    by the normalized weights that `iwae(estimator="dreg")` recorded (if any) before the
    reparameterization's own vector-Jacobian product. Every gradient reaching z from
    `iwae` (directly and through the decoder) carries w~_k once; this makes it w~_k^2.

    With the compiled sampler (`fused`), forward is vae_fast.reparameterize's op (z and
    eps in one pass) and an ordinary backward its backward kernel; otherwise, and in a
    recorded backward, plain torch on the saved tensors (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, slot, num_samples, generator, fused):
        if fused:
            return _ops.reparameterize(mu, logvar, num_samples, generator=generator)
        eps = _random.standard_normal(mu, num_samples, generator)
        z = mu.to(eps.dtype) + torch.exp(0.5 * logvar.to(eps.dtype)) * eps
        return z.to(mu.dtype), eps

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, slot, _, _, fused = inputs
        _, eps = output
        ctx.mark_non_differentiable(eps)
        ctx.save_for_backward(mu, logvar, eps)
        ctx.slot, ctx.fused = slot, fused

    @staticmethod
    def backward(ctx, grad_z, _grad_eps):
        mu, logvar, eps = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        weights = ctx.slot.weights
        if weights is not None:
            shape = weights.shape + (1,) * (grad_z.dim() - 2)
            grad_z = (grad_z.to(weights.dtype) * weights.reshape(shape)).to(grad_z.dtype)
        grad_mu = grad_logvar = None
        if ctx.fused and not torch.is_grad_enabled():
            if any(needs):
                grads = _ops._reparameterize_backward(grad_z, logvar, eps, list(needs))
                grad_mu, grad_logvar = (g if need else None for g, need in zip(grads, needs))
        else:
            g = grad_z.to(eps.dtype)
            if needs[0]:
                grad_mu = g.sum(0).to(mu.dtype)
            if needs[1]:
                half_sigma = 0.5 * torch.exp(0.5 * logvar.to(eps.dtype))
                grad_logvar = (g * eps).sum(0).mul(half_sigma).to(logvar.dtype)
        return grad_mu, grad_logvar, None, None, None, None


def _fused_sampler(mu: torch.Tensor, logvar: torch.Tensor) -> bool:
    """Whether iwae_sample draws with the compiled reparameterize op (the reference
    backend, torch.func transforms and devices without its kernel draw in torch)."""
    return (
        _LOAD_ERROR is None
        and not _autograd.runs_reference(mu, logvar)
        and torch._C._dispatch_has_kernel_for_dispatch_key(
            "vae_fast::reparameterize", mu.device.type.upper()
        )
    )


def iwae_sample(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """K reparameterized samples z_k = mu + exp(logvar/2) * eps_k for `iwae`.

    Required for ``iwae(..., estimator="dreg")`` and usable with every estimator. z is
    an ordinary differentiable tensor; in addition, its backward applies DReG's
    reweighting when (and only when) `iwae(estimator="dreg")` was called with this z.

    What the user must do for DReG:
        z = vae_fast.iwae_sample(mu, logvar, K)
        recon = decoder(z)                      # any function of z, shape (K, B, ...)
        loss, log_w = vae_fast.iwae(recon, x, z, mu, logvar, estimator="dreg")
    i.e. pass this very tensor (not a view, copy, ``.detach()`` or slice of it: iwae
    raises a ValueError then) and the very `mu`, `logvar` it was drawn from, one
    iwae(estimator="dreg") call per draw (a second one raises).

    What the user must not do: let z reach the loss by another way than the decoder
    and iwae (a regularizer on z, a second loss), because every gradient arriving at z
    is reweighted; compute such terms from a separate draw or from ``z.detach()``.
    ``estimator="dreg"`` does not run inside torch.compile (the weights are handed over
    at run time); compile the encoder and decoder, or use "stl". Here, under
    torch.compile, iwae_sample returns a plain reparameterized z.

    eps is vae_fast.reparameterize's stream with the fused backend (the same draw under
    the same seed), torch.randn's with the reference backend.

    Args:
        mu, logvar: the encoder's diagonal Gaussian, shape (B, ...).
        num_samples: K >= 1.
        generator: an explicit torch.Generator for eps.

    Returns:
        z of shape (K, *mu.shape), in mu's dtype.
    """
    V.check_tensors(_SAMPLE_FN, mu=mu, logvar=logvar)
    V.check_same_shape(_SAMPLE_FN, "mu", mu, "logvar", logvar)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{_SAMPLE_FN}: `num_samples` must be a positive int, got {num_samples!r}")
    if mu.dim() < 1:
        raise ValueError(
            f"{_SAMPLE_FN}: `mu` needs a leading batch dim, got shape {tuple(mu.shape)}"
        )
    if torch.compiler.is_compiling():  # no DReG there: a plain reparameterized z
        return reparameterize(mu, logvar, num_samples=num_samples, generator=generator)
    slot = _DRegSlot(mu, logvar)
    fused = _fused_sampler(mu, logvar)
    z, _ = _IWAESample.apply(mu, logvar, slot, num_samples, generator, fused)
    setattr(z, _SLOT, slot)
    return z


def _dreg_slot(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> _DRegSlot:
    """The slot of a z drawn by `iwae_sample` from these (mu, logvar); raises otherwise."""
    fn = f"{_FN}(estimator='dreg')"
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{fn} cannot run inside torch.compile: the normalized weights are handed to "
            "iwae_sample's backward at run time. Compile the encoder and decoder and call "
            "iwae_sample and iwae outside, or use estimator='stl'"
        )
    slot = getattr(z, _SLOT, None) if isinstance(z, torch.Tensor) else None
    if slot is None:
        raise ValueError(
            f"{fn}: `z` must be the tensor returned by vae_fast.iwae_sample(mu, logvar, K), "
            "as it is (not a view, copy, slice or detached version): DReG reweights the "
            "gradient that reaches z through the decoder, which only iwae_sample's backward "
            "can do. With z = mu + sigma*eps built by hand, use estimator='stl' or 'iwae'"
        )
    if slot.mu() is not mu or slot.logvar() is not logvar:
        raise ValueError(
            f"{fn}: `mu` and `logvar` must be the very tensors z was drawn from "
            "(vae_fast.iwae_sample(mu, logvar, K))"
        )
    if slot.weights is not None and torch.is_grad_enabled():
        raise ValueError(
            f"{fn}: this z was already used by an iwae(estimator='dreg') call that records "
            "gradients; its backward can reweight z's gradient for one call only. Draw "
            "fresh samples with vae_fast.iwae_sample for each loss"
        )
    return slot


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
    V.check_option(_FN, "estimator", estimator, ESTIMATORS)
    # Looked up before autocast may replace z by a float32 copy.
    slot = _dreg_slot(z, mu, logvar) if estimator == "dreg" else None
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


@_public(reference_iwae)
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
    check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
    validate = V.resolve_validate_args(validate_args)
    inputs = (x, recon, z, mu, logvar, obs_logvar)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    loss, log_weights, *_ = _ops.iwae(
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
    check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
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
        return reference_iwae(
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


def _is_exactly_one(t: torch.Tensor) -> bool:
    # Free to read on the CPU; elsewhere a host sync, so never read there.
    return (
        t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and t.numel() == 1
        and t.item() == 1
    )


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
    # Scaled in place when the graph is freed after this backward; as new tensors when
    # it is retained, so that a later backward reads the saved values unchanged.
    keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
    one = not per_row and _is_exactly_one(grad_loss)
    out = []
    for i, g in enumerate(wanted):
        if g is not None and not one:
            scale = grad_loss.to(g.dtype)
            if per_row:  # (B,) against (K, B, ...) for recon and z, (B, ...) for mu, logvar
                lead = 1 if i < 2 else 0
                scale = scale.reshape((1,) * lead + scale.shape + (1,) * (g.dim() - lead - 1))
            g = g * scale if keep_graph else g.mul_(scale)
        elif g is not None and keep_graph:
            g = g.clone()
        out.append(g)
    return (None, *out, *no_grads)


def _register() -> None:
    torch.library.register_fake("vae_fast::iwae", _fake_iwae)
    _autograd.register("iwae", _setup_iwae, _backward_iwae)
    for device in ("cpu", "cuda"):
        torch.library.register_autocast("vae_fast::iwae", device, torch.float32)


if _LOAD_ERROR is None:
    _register()
