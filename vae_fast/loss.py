"""The fused negative ELBO, `vae_fast.elbo`: a typed wrapper over torch.ops.vae_fast.elbo
(and _elbo_into_recon, its in-place-gradient form), with their fake kernels and
autograd. The forward pass computes the gradients of the loss; an ordinary backward
only scales them (`_autograd.hand_back`), other backwards run the single-term ops'
backward kernels or, when recorded, the reference's vector-Jacobian product.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from vae_fast import _autograd, reference
from vae_fast import _validate as V
from vae_fast import _validate_inplace as VI
from vae_fast._extension import (
    like_or_empty,
    ops,
    public,
    register_op,
    register_python_kernel,
    wanted,
)

# --------------------------------------------------------------------------- elbo


@public(reference.elbo)
def elbo(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    beta: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    inplace_grad: bool = False,
    num_samples: int | None = None,
    validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative ELBO of a VAE with a diagonal Gaussian encoder and N(0, I) prior.

    The argument order is that of the VAE losses users port from (pytorch/examples'
    ``loss_function(recon_x, x, mu, logvar)``, pythae) and of torch's own losses,
    ``(input, target)``.

    Args:
        recon: decoder output of x's shape: logits for ``likelihood="bernoulli"``
            (not probabilities: apply ``torch.sigmoid`` only where pictures are made),
            means for ``"gaussian"``.
        x: data, shape (B, ...).
        mu, logvar: the encoder's posterior, shape (B, ...) (any trailing shape).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        obs_logvar: Gaussian observation log-variance broadcastable to x (scalar,
            per-feature or per-element; learnable); None means 0.
        beta: weight of the KL term: a number, or a 0-d tensor (which gets its
            gradient if it requires one). A tensor that changes every step (a KL
            warm-up) does not make torch.compile recompile.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
        inplace_grad: write d(loss)/d(recon) over `recon` itself in the forward pass
            instead of into a fresh tensor of x's size, whose page faults dominate
            large batches on CPU (as Liger-Kernel's cross-entropy does with logits).
            `recon` must be a contiguous non-leaf whose values nothing else needs:
            the output of e.g. ``nn.Linear``, not of ``sigmoid`` (which saves it for
            its backward). After the call `recon` holds the gradient; `log_likelihood`
            and `kl` come back detached (for logging); reduction must be ``"mean"``
            or ``"sum"`` and `x` must not require grad; a backward with
            create_graph=True raises. It only acts when `recon` needs a gradient, in
            eager mode (torch.compile plans its own buffers). Targets outside [0, 1] are
            found in the same pass, so when that ValueError is raised `recon` has
            already been overwritten.
        num_samples: K for the multi-sample ELBO: `recon` is the decoder's output for K
            samples of z per example, shape (K, *x.shape), and the log-likelihood is
            their mean, taken in the same pass (x is read by every sample, never
            repeated in memory); the analytic KL is computed once, not per sample.
        validate_args: for the Bernoulli likelihood, raise a ValueError naming `x` if a
            target lies outside [0, 1] (raw 0..255 pixels, or recon and x swapped);
            found in the pass that reads x. None follows
            `vae_fast.set_default_validate_args` (on by default).

    Returns:
        ``(loss, log_likelihood, kl)``: loss is ``beta*kl - log_likelihood`` reduced;
        the other two have shape (B,). Gradients flow to recon, mu, logvar,
        obs_logvar and beta (and x, if it requires grad), to any order.
    """
    V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
    V.check_elbo_samples(x, recon, num_samples)
    V.check_flag("vae_fast.elbo", "inplace_grad", inplace_grad)
    beta = V.check_beta(beta, x)
    validate = V.resolve_validate_args("vae_fast.elbo", validate_args)
    inputs = (x, recon, mu, logvar, obs_logvar, beta)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if inplace_grad and wants_grad and recon.requires_grad and not torch.compiler.is_compiling():
        VI.check_inplace_grad_layout(recon, reduction)  # (the op checks the rest: see below)
        loss, ll, kl, *_ = ops._elbo_into_recon(
            x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, validate
        )
        return loss, ll, kl
    # With reduction="none" the gradient depends on grad_output per row, so the
    # forward pass has nothing to precompute: backward runs one pass per term.
    compute_grad = wants_grad and reduction != "none"
    loss, ll, kl, *_ = ops.elbo(
        x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate
    )
    return loss, ll, kl


def _fake_elbo(
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate_x=True
):
    V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
    V.check_beta(beta, x)
    batch = x.shape[0]
    return (
        x.new_empty((batch,) if reduction == "none" else ()),
        x.new_empty((batch,)),
        x.new_empty((batch,)),
        like_or_empty(compute_grad, recon, x),
        like_or_empty(compute_grad, obs_logvar, x),
        like_or_empty(compute_grad, mu, x),
        like_or_empty(compute_grad, logvar, x),
    )


def _fake_elbo_into_recon(
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, validate_x=True
):
    VI.check_inplace_grad_layout(recon, reduction)
    outputs = _fake_elbo(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, True)
    loss, ll, kl, _, g_obs, g_mu, g_logvar = outputs
    return loss, ll, kl, g_obs, g_mu, g_logvar


def _elbo_reference(likelihood, reduction):
    """elbo's reference as a function of its six differentiable inputs."""

    def loss_ll_kl(x, recon, mu, logvar, obs_logvar, beta):
        return reference.elbo(
            recon,
            x,
            mu,
            logvar,
            likelihood=likelihood,
            obs_logvar=obs_logvar,
            beta=beta,
            reduction=reduction,
            num_samples=recon.shape[0] if recon.dim() == x.dim() + 1 else None,
            validate_args=False,
        )

    return loss_ll_kl


def _elbo_backward(
    grad_loss,
    grad_ll,
    grad_kl,
    x,
    recon,
    mu,
    logvar,
    obs_logvar,
    beta,
    kl,
    likelihood,
    reduction,
    output_mask,
):
    """torch.ops.vae_fast._elbo_backward: elbo's backward where it is not the scaling of
    the gradients its forward pass computed, which csrc/elbo_autograd.cpp does itself.
    Gradients of (x, recon, mu, logvar, obs_logvar, beta) for `output_mask`."""
    needs = tuple(output_mask)
    inputs = (x, recon, mu, logvar, obs_logvar, beta)
    if torch.is_grad_enabled():  # a recorded backward: the reference's, to any order
        grads = (grad_loss, grad_ll, grad_kl)
        return list(
            _autograd.reference_vjp(_elbo_reference(likelihood, reduction), inputs, needs, grads)
        )
    g_beta = _beta_gradient(reduction, kl, beta, grad_loss) if needs[5] else None
    return [
        *_elbo_general_backward(
            needs, likelihood, reduction, *inputs[:5], beta, grad_loss, grad_ll, grad_kl
        ),
        g_beta,
    ]


def _beta_gradient(reduction, kl, beta, grad_loss):
    """d(loss)/d(beta) = the reduced KL; the returned kl and log_likelihood do not
    depend on beta. (csrc/elbo_autograd.cpp's beta_gradient is the same.)"""
    if grad_loss is None:
        return None
    opmath = V.opmath_dtype(kl.dtype)
    weighted = kl.to(opmath) * grad_loss.to(opmath)
    g = weighted.sum()
    if reduction == "mean":
        g = g / max(kl.shape[0], 1)  # (over no rows: 0, as the mean's backward gives; not nan)
    return g.to(device=beta.device, dtype=beta.dtype)


def _elbo_general_backward(
    needs,
    likelihood,
    reduction,
    x,
    recon,
    mu,
    logvar,
    obs_logvar,
    beta,
    grad_loss,
    grad_ll,
    grad_kl,
):
    """Per-row weights (from reduction="none", or gradients of the returned
    log_likelihood / kl): one backward pass per term that has a weight; a term that
    receives none gives its inputs no gradient (None, not zeros)."""
    batch = x.shape[0]
    opmath = V.opmath_dtype(x.dtype)
    per_row = None
    if grad_loss is not None:
        scale = 1.0 / max(batch, 1) if reduction == "mean" else 1.0
        per_row = (grad_loss.to(opmath) * scale).expand(batch)
    w_ll = _add(None if per_row is None else -per_row, grad_ll, opmath)
    w_kl = _add(None if per_row is None else beta.to(opmath) * per_row, grad_kl, opmath)
    gx = gr = gmu = glv = gobs = None
    if w_ll is not None and (needs[0] or needs[1] or needs[4]):
        x_rows, event_dims = x, x.dim() - 1
        if recon.dim() == x.dim() + 1:
            # K samples: each row of a sample gets the weight / K; x is expanded here, on
            # this rare path (per-row weights) only, and its gradient summed back.
            samples = recon.shape[0]
            w_ll = (w_ll / samples).expand(samples, batch)
            x_rows = x.expand(recon.shape)
        w_ll = w_ll.to(x.dtype)
        if likelihood == "bernoulli":
            gx, gr = ops._bernoulli_log_prob_backward(
                w_ll, x_rows, recon, event_dims, [needs[0], needs[1]]
            )
        else:
            obs = obs_logvar if obs_logvar is not None else x.new_zeros(())
            gx, gr, gobs = ops._gaussian_log_prob_backward(
                w_ll, x_rows, recon, obs, event_dims, [needs[0], needs[1], needs[4]]
            )
        if needs[0] and x_rows is not x:
            gx = gx.sum(0)
    if w_kl is not None and (needs[2] or needs[3]):
        gmu, glv, _, _ = ops._gaussian_kl_backward(
            w_kl.to(x.dtype),
            mu,
            logvar,
            None,
            None,
            mu.dim() - 1,
            [needs[2], needs[3], False, False],
        )
    return wanted((gx, gr, gmu, glv, gobs), needs[:5])


def _add(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if b is not None:
        b = b.to(dtype)
    if a is None:
        return b
    return a if b is None else a + b


def _check_elbo_into_recon_call(inputs, recording):
    """Before recon is written over: what torch's in-place ops refuse, and (when autograd
    records the call) what the gradient written over recon cannot serve."""
    x, recon = inputs[:2]
    VI.check_overwritable("vae_fast.elbo(inplace_grad=True)", "recon", recon)
    # (Traced calls have no storage to look at: torch.compile plans its own buffers.)
    traced = torch.compiler.is_compiling() or recon.device.type == "meta" or is_fake(recon)
    if recording and not traced:
        VI.check_inplace_grad_autograd(x, recon)


def _setup_elbo_into_recon(ctx, inputs, output):
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, _ = inputs
    _, ll, kl, g_obs, g_mu, g_logvar = output
    # Ops declared in C++ do not bump the version of what they mutate; this does,
    # so that a backward that saved recon (or a view of it) raises, not lies.
    torch.autograd.graph.increment_version(recon)
    ctx.mark_non_differentiable(ll, kl, g_obs, g_mu, g_logvar)
    # recon holds its own gradient now.
    ctx.save_for_backward(beta, kl, recon, g_mu, g_logvar, g_obs)
    ctx.reduction = reduction


def _backward_elbo_into_recon(ctx, grad_loss, *_):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "vae_fast.elbo(inplace_grad=True) cannot be differentiated twice "
            "(create_graph=True or torch.func): its gradient was written over recon in the "
            "forward pass; use inplace_grad=False"
        )
    beta, kl, *fused = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_beta = _beta_gradient(ctx.reduction, kl, beta, grad_loss) if needs[6] else None
    if grad_loss is None:
        return (None,) * 6 + (g_beta, None, None)
    grads = _autograd.hand_back(wanted(fused, needs[1:5]), grad_loss)
    return (None, *grads, None, g_beta, None, None)


register_op("elbo", _fake_elbo, autocast=True, autograd_in_cpp=True)
register_python_kernel("_elbo_backward", _elbo_backward)
register_op(
    "_elbo_into_recon",
    _fake_elbo_into_recon,
    _setup_elbo_into_recon,
    _backward_elbo_into_recon,
    overwritten=1,
    check_call=_check_elbo_into_recon_call,
)
