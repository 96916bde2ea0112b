"""The single-term vae_fast functions: typed wrappers over torch.ops.vae_fast.*.

bernoulli_log_prob, gaussian_log_prob, gaussian_kl and reparameterize; the fused
negative ELBO is in `vae_fast.loss`, the importance-weighted bound in `vae_fast.iwae`.
The schemas live in csrc/ops.cpp and the kernels in csrc/. Beside each function sit
its fake kernel (shapes and dtypes, for torch.compile and meta tensors) and its
autograd: a `setup_context` and a `backward`, registered as the op's one autograd route
(`vae_fast._autograd` says how create_graph, torch.func and forward AD are served).
Every public function goes through `public`, the one place that applies autocast and
picks the fused op or `vae_fast.reference`.
"""

from __future__ import annotations

import torch

from vae_fast import _autograd, reference
from vae_fast import _validate as V
from vae_fast import _validate_backward as VB
from vae_fast._extension import (
    batch_shape,
    like_or_empty,
    ops,
    public,
    register_op,
    wanted,
)

# --------------------------------------------------------------------------- bernoulli_log_prob


@public(reference.bernoulli_log_prob)
def bernoulli_log_prob(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    event_dims: int | None = None,
    validate_args: bool | None = None,
) -> torch.Tensor:
    """Log-likelihood of x under Bernoulli(logits), summed over the event dims.

    Args:
        x: targets in [0, 1] (binary or soft), any shape (B, ...).
        logits: same shape as `x`. Exact for logits of +-1e4 and +-inf.
        event_dims: how many trailing dims to sum; None sums every dim but the first.
        validate_args: raise a ValueError naming `x` if a target lies outside [0, 1]
            (found in the pass that reads x; NaN targets give NaN). None follows
            `vae_fast.set_default_validate_args` (on by default).

    Returns:
        The batch-shaped sum of ``x*logits - softplus(logits)``, in x's dtype.
    """
    k = V.check_bernoulli_log_prob(x, logits, event_dims)
    return ops.bernoulli_log_prob(
        x, logits, k, V.resolve_validate_args("vae_fast.bernoulli_log_prob", validate_args)
    )


def _fake_bernoulli(x, logits, event_dims, validate_x=True):
    V.check_bernoulli_log_prob(x, logits, event_dims)  # the C++ checks, for meta tensors
    return x.new_empty(batch_shape(x, event_dims))


def _fake_bernoulli_backward(grad, x, logits, event_dims, output_mask):
    V.check_bernoulli_log_prob(x, logits, event_dims)
    VB.check_row_grad("vae_fast.bernoulli_log_prob", grad, "x", x, event_dims)
    VB.check_output_mask("vae_fast.bernoulli_log_prob", output_mask, 2)
    return like_or_empty(output_mask[0], x, x), like_or_empty(output_mask[1], logits, x)


def _setup_bernoulli(ctx, inputs, output):
    x, logits, event_dims, _ = inputs
    ctx.save_for_backward(x, logits)
    ctx.event_dims = event_dims


def _backward_bernoulli(ctx, grad):
    x, logits = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():
        return _autograd.reference_vjp(
            lambda x, logits: (
                reference.bernoulli_log_prob(
                    x, logits, event_dims=ctx.event_dims, validate_args=False
                ),
            ),
            (x, logits),
            needs,
            (grad,),
        ) + (None, None)
    gx, gl = ops._bernoulli_log_prob_backward(grad, x, logits, ctx.event_dims, list(needs))
    return (*wanted((gx, gl), needs), None, None)


register_op(
    "bernoulli_log_prob", _fake_bernoulli, _setup_bernoulli, _backward_bernoulli, autocast=True
)
register_op("_bernoulli_log_prob_backward", _fake_bernoulli_backward)


# --------------------------------------------------------------------------- gaussian_log_prob


@public(reference.gaussian_log_prob)
def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *, event_dims: int | None = None
) -> torch.Tensor:
    """Log-density of x under N(mean, exp(logvar)), summed over the event dims.

    Args:
        x: observations, shape (B, ...).
        mean: same shape as `x`.
        logvar: log-variance broadcastable to `x`: a 0-d scalar, a per-feature tensor
            (trailing dims of x) or per element. Its gradient comes back in its own shape.
        event_dims: how many trailing dims to sum; None sums every dim but the first.

    Returns:
        The batch-shaped sum of ``-0.5*(log(2pi) + logvar + (x-mean)^2 exp(-logvar))``.
    """
    k = V.check_gaussian_log_prob(x, mean, logvar, event_dims)
    return ops.gaussian_log_prob(x, mean, logvar, k)


def _fake_gaussian(x, mean, logvar, event_dims):
    V.check_gaussian_log_prob(x, mean, logvar, event_dims)
    return x.new_empty(batch_shape(x, event_dims))


def _fake_gaussian_backward(grad, x, mean, logvar, event_dims, output_mask):
    V.check_gaussian_log_prob(x, mean, logvar, event_dims)
    VB.check_row_grad("vae_fast.gaussian_log_prob", grad, "x", x, event_dims)
    VB.check_output_mask("vae_fast.gaussian_log_prob", output_mask, 3)
    return tuple(like_or_empty(m, t, x) for m, t in zip(output_mask, (x, mean, logvar)))


def _setup_gaussian(ctx, inputs, output):
    x, mean, logvar, event_dims = inputs
    ctx.save_for_backward(x, mean, logvar)
    ctx.event_dims = event_dims


def _backward_gaussian(ctx, grad):
    x, mean, logvar = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        return _autograd.reference_vjp(
            lambda *t: (reference.gaussian_log_prob(*t, event_dims=ctx.event_dims),),
            (x, mean, logvar),
            needs,
            (grad,),
        ) + (None,)
    grads = ops._gaussian_log_prob_backward(grad, x, mean, logvar, ctx.event_dims, list(needs))
    return (*wanted(grads, needs), None)


register_op("gaussian_log_prob", _fake_gaussian, _setup_gaussian, _backward_gaussian, autocast=True)
register_op("_gaussian_log_prob_backward", _fake_gaussian_backward)


# --------------------------------------------------------------------------- gaussian_kl


@public(reference.gaussian_kl)
def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    *,
    event_dims: int | None = None,
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), summed over the event dims.

    Args:
        mu, logvar: the encoder's diagonal Gaussian, both of shape (B, ...).
        prior_mu, prior_logvar: the prior, broadcastable to `mu`; None means 0 (the
            standard normal prior when both are None). All four inputs get gradients.
        event_dims: how many trailing dims to sum; None sums every dim but the first.

    Returns:
        The batch-shaped KL divergence, in mu's dtype.
    """
    k = V.check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)
    return ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, k)


def _fake_kl(mu, logvar, prior_mu, prior_logvar, event_dims):
    V.check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)
    return mu.new_empty(batch_shape(mu, event_dims))


def _fake_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, event_dims, output_mask):
    V.check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)
    VB.check_row_grad("vae_fast.gaussian_kl", grad, "mu", mu, event_dims)
    VB.check_output_mask("vae_fast.gaussian_kl", output_mask, 4)
    like = (mu, logvar, prior_mu, prior_logvar)
    return tuple(like_or_empty(m, t, mu) for m, t in zip(output_mask, like))


def _setup_kl(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, event_dims = inputs
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
    ctx.event_dims = event_dims


def _backward_kl(ctx, grad):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        return _autograd.reference_vjp(
            lambda *t: (reference.gaussian_kl(*t, event_dims=ctx.event_dims),),
            saved,
            needs,
            (grad,),
        ) + (None,)
    grads = ops._gaussian_kl_backward(grad, *saved, ctx.event_dims, list(needs))
    return (*wanted(grads, needs), None)


register_op("gaussian_kl", _fake_kl, _setup_kl, _backward_kl, autocast=True)
register_op("_gaussian_kl_backward", _fake_kl_backward)


# --------------------------------------------------------------------------- reparameterize


@public(reference.reparameterize, autocast=False)
def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    eps: torch.Tensor | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A reparameterized sample z = mu + exp(logvar/2) * eps, eps ~ N(0, 1).

    eps is a counter-based Philox4x32-10 stream keyed by torch's generator (the
    default one, so ``torch.manual_seed`` reproduces a draw, or `generator`; a
    restored generator state replays one). On CPU the key is one 64-bit draw from
    the generator and all cores draw at once, with the same result for any thread
    count; on CUDA it is the generator's seed and offset, as torch's own kernels use.
    It is not ``torch.randn``'s sequence: pass `eps` to reproduce a run that drew
    with torch.randn. Backward uses eps exactly: dz/dmu = 1 and
    dz/dlogvar = 0.5*sigma*eps, even where sigma << |mu|.

    Args:
        mu, logvar: shape (B, ...), equal shapes.
        eps: a given standard-normal draw of z's shape, used as it is (a constant:
            no gradient flows to it); then nothing is drawn.
        num_samples: K independent samples, returned as shape (K, *mu.shape).
        generator: an explicit torch.Generator (cannot be traced by torch.compile).

    Returns:
        z, of shape mu.shape or (num_samples, *mu.shape), in mu's dtype.
    """
    num_samples = V.check_reparameterize(mu, logvar, num_samples, eps)
    if eps is not None:  # nothing to draw: the same three elementwise ops in torch
        return reference.reparameterize(mu, logvar, eps=eps, num_samples=num_samples)
    z, _ = ops.reparameterize(mu, logvar, num_samples, generator=generator)
    return z


def _fake_reparameterize(mu, logvar, num_samples=None, *, generator=None):
    V.check_reparameterize(mu, logvar, num_samples)
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    return mu.new_empty(shape), mu.new_empty(shape, dtype=V.opmath_dtype(mu.dtype))


def _fake_reparameterize_backward(grad_z, logvar, eps, output_mask):
    VB.check_reparameterize_backward(grad_z, logvar, eps, output_mask)
    return tuple(like_or_empty(m, logvar, logvar) for m in output_mask)


def _setup_reparameterize(ctx, inputs, output):
    mu, logvar, num_samples = inputs
    _, eps = output
    ctx.save_for_backward(mu, logvar, eps)
    ctx.mark_non_differentiable(eps)
    ctx.num_samples = num_samples


def _backward_reparameterize(ctx, grad_z, grad_eps):
    mu, logvar, eps = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    return (*reparameterize_vjp(mu, logvar, eps, ctx.num_samples, needs, grad_z), None)


def reparameterize_vjp(mu, logvar, eps, num_samples, needs, grad_z, *, fused=True):
    """The gradients (mu's, logvar's; None where not in `needs`) of z = mu + exp(logvar/2)
    * eps for the cotangent grad_z: the backward kernel, or the reference's vector-Jacobian
    product when the backward is recorded (differentiable again) or not `fused`."""
    if not fused or torch.is_grad_enabled():
        return _autograd.reference_vjp(
            lambda mu, logvar: (
                reference.reparameterize(mu, logvar, eps=eps, num_samples=num_samples),
            ),
            (mu, logvar),
            needs,
            (grad_z,),
        )
    one_sample = num_samples is None
    # One sample: dz/dmu = 1, so grad_z itself is mu's gradient (no copy is written).
    mask = [needs[0] and not one_sample, needs[1]]
    gm = glv = None
    if any(mask):
        gm, glv = ops._reparameterize_backward(grad_z, logvar, eps, mask)
    if one_sample:
        gm = grad_z
    return wanted((gm, glv), needs)


def _vmap_reparameterize(info, in_dims, mu, logvar, num_samples=None, *, generator=None):
    """A direct torch.ops call under vmap. The kernel draws for its whole input, so it
    can only honour randomness="different", one draw per row, as torch's fallback did;
    "error" (which must raise) and "same" (one draw shared by the rows) it refuses.
    The public function follows every mode (it runs the reference under vmap)."""
    if info.randomness != "different":
        raise RuntimeError(
            "vae_fast: torch.ops.vae_fast.reparameterize draws random numbers and under vmap "
            f"can follow randomness='different' only (got {info.randomness!r}); call "
            "vae_fast.reparameterize, which follows vmap's randomness modes as torch.randn does"
        )

    def row(t, dim, i):
        return t if dim is None else t.select(dim, i)

    draws = [
        ops.reparameterize(row(mu, in_dims[0], i), row(logvar, in_dims[1], i), num_samples,
                           generator=generator)
        for i in range(info.batch_size)
    ]  # fmt: skip
    z, eps = (torch.stack(parts) for parts in zip(*draws))
    return (z, eps), (0, 0)


register_op(
    "reparameterize",
    _fake_reparameterize,
    _setup_reparameterize,
    _backward_reparameterize,
    vmap=_vmap_reparameterize,
)
register_op("_reparameterize_backward", _fake_reparameterize_backward)
