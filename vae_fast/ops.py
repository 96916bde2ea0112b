"""Typed wrappers over torch.ops.vae_fast.*, with their fake kernels and autograd.

The schemas live in csrc/ops.cpp and the kernels in csrc/cpu and csrc/cuda.
Fake kernels let torch.compile trace through the ops without running them;
autograd calls the private `_<op>_backward` ops (one pass each). The fused
`elbo` computes its gradients in the forward pass, so its backward only scales
them (and returns them untouched when grad_output is exactly 1).
"""

from __future__ import annotations

import torch

from vae_fast import _validate as V
from vae_fast import reference
from vae_fast._backend import current_backend

try:  # loading the compiled library registers the operators with torch
    from vae_fast import _C  # noqa: F401

    _LOAD_ERROR: ImportError | None = None
except ImportError as error:  # a source checkout that was never built
    _LOAD_ERROR = error

_ops = torch.ops.vae_fast


def _require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            f"vae_fast's compiled extension (vae_fast._C) is not available ({_LOAD_ERROR}); "
            "build it with `make build` (or `pip install --no-build-isolation -e .`), "
            "or use `with vae_fast.backend('reference'):`"
        )


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _wanted(grads, needs) -> tuple[torch.Tensor | None, ...]:
    """The gradients autograd asked for; the ops return empty tensors for the others."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under autocast the losses run in float32, as torch's own losses do.

    Done here, before the dtype check, because autocast leaves the usual mix (data in
    float32, decoder output in bfloat16) to the op, and the op requires one dtype.
    """
    first = next(t for t in tensors if t is not None)
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    return tuple(
        t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors
    )


def _batch_shape(x: torch.Tensor, event_dims: int) -> tuple[int, ...]:
    return tuple(x.shape[: x.dim() - event_dims])


# --------------------------------------------------------------------------- public API


def bernoulli_log_prob(
    x: torch.Tensor, logits: torch.Tensor, *, event_dims: int | None = None
) -> torch.Tensor:
    """Log-likelihood of x under Bernoulli(logits), summed over the event dims.

    Args:
        x: targets in [0, 1] (binary or soft), any shape (B, ...).
        logits: same shape as `x`. Finite and exact for logits of +-1e4.
        event_dims: how many trailing dims to sum; None sums every dim but the first.

    Returns:
        The batch-shaped sum of ``x*logits - softplus(logits)``, in x's dtype.
    """
    x, logits = _autocast_inputs(x, logits)
    if current_backend() == "reference":
        return reference.bernoulli_log_prob(x, logits, event_dims=event_dims)
    _require_extension()
    k = V.check_bernoulli_log_prob(x, logits, event_dims)
    return _call("bernoulli_log_prob", x, logits, k)


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
    x, mean, logvar = _autocast_inputs(x, mean, logvar)
    if current_backend() == "reference":
        return reference.gaussian_log_prob(x, mean, logvar, event_dims=event_dims)
    _require_extension()
    k = V.check_gaussian_log_prob(x, mean, logvar, event_dims)
    return _call("gaussian_log_prob", x, mean, logvar, k)


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
    mu, logvar, prior_mu, prior_logvar = _autocast_inputs(mu, logvar, prior_mu, prior_logvar)
    if current_backend() == "reference":
        return reference.gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims=event_dims)
    _require_extension()
    k = V.check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)
    return _call("gaussian_kl", mu, logvar, prior_mu, prior_logvar, k)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A reparameterized sample z = mu + exp(logvar/2) * eps, eps ~ N(0, 1).

    eps is a counter-based Philox4x32-10 stream keyed by torch's generator (the
    default one, so ``torch.manual_seed`` reproduces a draw, or `generator`; a
    restored generator state replays one). On CPU the key is one 64-bit draw from
    the generator and all cores draw at once, with the same result for any thread
    count; on CUDA it is the generator's seed and offset, as torch's own kernels use.
    It is not ``torch.randn``'s sequence (nor the reference backend's). Backward uses
    eps exactly: dz/dmu = 1 and dz/dlogvar = 0.5*sigma*eps, even where sigma << |mu|.

    Args:
        mu, logvar: shape (B, ...), equal shapes.
        num_samples: K independent samples, returned as shape (K, *mu.shape).
        generator: an explicit torch.Generator (cannot be traced by torch.compile).

    Returns:
        z, of shape mu.shape or (num_samples, *mu.shape), in mu's dtype.
    """
    if current_backend() == "reference":
        return reference.reparameterize(mu, logvar, num_samples=num_samples, generator=generator)
    _require_extension()
    V.check_reparameterize(mu, logvar, num_samples)
    z, _ = _call("reparameterize", mu, logvar, num_samples, generator=generator)
    return z


def elbo(
    x: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "mean",
    inplace_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative ELBO of a VAE with a diagonal Gaussian encoder and N(0, I) prior.

    Args:
        x: data, shape (B, ...).
        recon: decoder output of x's shape: logits for ``likelihood="bernoulli"``,
            means for ``"gaussian"``.
        mu, logvar: the encoder's posterior, shape (B, ...) (any trailing shape).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        obs_logvar: Gaussian observation log-variance broadcastable to x (scalar,
            per-feature or per-element; learnable); None means 0.
        beta: weight of the KL term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
        inplace_grad: write d(loss)/d(recon) over `recon` itself in the forward pass
            instead of into a fresh tensor of x's size, whose page faults dominate
            large batches on CPU (as Liger-Kernel's cross-entropy does with logits).
            `recon` must be a contiguous non-leaf whose values nothing else needs:
            the output of e.g. ``nn.Linear``, not of ``sigmoid`` (which saves it for
            its backward). After the call `recon` holds the gradient; `log_likelihood`
            and `kl` come back detached (for logging); reduction must be ``"mean"``
            or ``"sum"`` and `x` must not require grad. A grad_output other than 1
            scales the gradients in place, so a second such backward through a
            retained graph raises. It only acts when `recon` needs a gradient, in
            eager mode (torch.compile plans its own buffers).

    Returns:
        ``(loss, log_likelihood, kl)``: loss is ``beta*kl - log_likelihood`` reduced;
        the other two have shape (B,). Gradients flow to recon, mu, logvar and
        obs_logvar (and x, if it requires grad).
    """
    x, recon, mu, logvar, obs_logvar = _autocast_inputs(x, recon, mu, logvar, obs_logvar)
    if current_backend() == "reference":
        return reference.elbo(
            x,
            recon,
            mu,
            logvar,
            likelihood=likelihood,
            obs_logvar=obs_logvar,
            beta=beta,
            reduction=reduction,
        )
    _require_extension()
    V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, recon, mu, logvar, obs_logvar)
    )
    if inplace_grad and compute_grad and recon.requires_grad and not torch.compiler.is_compiling():
        V.check_inplace_grad_layout(recon, reduction)
        V.check_inplace_grad_autograd(x, recon)
        return _ElboIntoRecon.apply(
            x, recon, mu, logvar, obs_logvar, likelihood, float(beta), reduction
        )
    loss, ll, kl, *_ = _call(
        "elbo", x, recon, mu, logvar, obs_logvar, likelihood, float(beta), reduction, compute_grad
    )
    return loss, ll, kl


class _ElboIntoRecon(torch.autograd.Function):
    """elbo with d(loss)/d(recon) written over recon (the `_elbo_into_recon` op).

    A Function rather than registered autograd: the op mutates recon, which
    torch.library's autograd registration does not support. Backward returns the
    stored gradients (scaled in place when grad_output is not exactly 1).
    """

    @staticmethod
    def forward(ctx, x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction):
        loss, ll, kl, g_obs, g_mu, g_logvar = _ops._elbo_into_recon(
            x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction
        )
        # Ops declared in C++ do not bump the version of what they mutate; this does,
        # so that a backward that saved recon (or a view of it) raises, not lies.
        torch.autograd.graph.increment_version(recon)
        ctx.mark_non_differentiable(ll, kl)
        ctx.save_for_backward(recon, g_mu, g_logvar, g_obs)
        return loss, ll, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ll, grad_kl):
        grads = ctx.saved_tensors
        if not _is_exactly_one(grad_loss):
            grads = tuple(g.mul_(grad_loss.to(g.dtype)) for g in grads)
        g_recon, g_mu, g_logvar, g_obs = grads
        needs = ctx.needs_input_grad
        return (None, *_wanted((g_recon, g_mu, g_logvar, g_obs), needs[1:5]), None, None, None)


# --------------------------------------------------------------------------- fake kernels
# torch.compile traces with fake tensors; these give output shapes and dtypes only.
# Registered only when the compiled library (which defines the ops) is loaded.


def _register_fake_kernels() -> None:

    @torch.library.register_fake("vae_fast::bernoulli_log_prob")
    def _(x, logits, event_dims):
        return x.new_empty(_batch_shape(x, event_dims))

    @torch.library.register_fake("vae_fast::_bernoulli_log_prob_backward")
    def _(grad, x, logits, event_dims, output_mask):
        return (
            torch.empty_like(x) if output_mask[0] else _empty_grad(x),
            torch.empty_like(logits) if output_mask[1] else _empty_grad(x),
        )

    @torch.library.register_fake("vae_fast::gaussian_log_prob")
    def _(x, mean, logvar, event_dims):
        return x.new_empty(_batch_shape(x, event_dims))

    @torch.library.register_fake("vae_fast::_gaussian_log_prob_backward")
    def _(grad, x, mean, logvar, event_dims, output_mask):
        return (
            torch.empty_like(x) if output_mask[0] else _empty_grad(x),
            torch.empty_like(mean) if output_mask[1] else _empty_grad(x),
            torch.empty_like(logvar) if output_mask[2] else _empty_grad(x),
        )

    @torch.library.register_fake("vae_fast::gaussian_kl")
    def _(mu, logvar, prior_mu, prior_logvar, event_dims):
        return mu.new_empty(_batch_shape(mu, event_dims))

    @torch.library.register_fake("vae_fast::_gaussian_kl_backward")
    def _(grad, mu, logvar, prior_mu, prior_logvar, event_dims, output_mask):
        like = (mu, logvar, prior_mu, prior_logvar)
        return tuple(
            torch.empty_like(t) if m and t is not None else _empty_grad(mu)
            for m, t in zip(output_mask, like)
        )

    @torch.library.register_fake("vae_fast::reparameterize")
    def _(mu, logvar, num_samples=None, *, generator=None):
        shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
        return mu.new_empty(shape), mu.new_empty(shape, dtype=V.opmath_dtype(mu.dtype))

    @torch.library.register_fake("vae_fast::_reparameterize_backward")
    def _(grad_z, logvar, eps, output_mask):
        return (
            torch.empty_like(logvar) if output_mask[0] else _empty_grad(logvar),
            torch.empty_like(logvar) if output_mask[1] else _empty_grad(logvar),
        )

    @torch.library.register_fake("vae_fast::elbo")
    def fake_elbo(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad):
        V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
        batch = x.shape[0]
        loss = x.new_empty((batch,) if reduction == "none" else ())
        wants_obs = compute_grad and obs_logvar is not None
        return (
            loss,
            x.new_empty((batch,)),
            x.new_empty((batch,)),
            torch.empty_like(recon) if compute_grad else _empty_grad(x),
            torch.empty_like(obs_logvar) if wants_obs else _empty_grad(x),
            torch.empty_like(mu) if compute_grad else _empty_grad(x),
            torch.empty_like(logvar) if compute_grad else _empty_grad(x),
        )

    @torch.library.register_fake("vae_fast::_elbo_into_recon")
    def _(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction):
        V.check_inplace_grad_layout(recon, reduction)
        outputs = fake_elbo(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, True)
        loss, ll, kl, _, g_obs, g_mu, g_logvar = outputs
        return loss, ll, kl, g_obs, g_mu, g_logvar


# --------------------------------------------------------------------------- autograd


def _setup_bernoulli(ctx, inputs, output):
    x, logits, event_dims = inputs
    ctx.save_for_backward(x, logits)
    ctx.event_dims = event_dims


def _backward_bernoulli(ctx, grad):
    x, logits = ctx.saved_tensors
    gx, gl = _ops._bernoulli_log_prob_backward(
        grad, x, logits, ctx.event_dims, list(ctx.needs_input_grad[:2])
    )
    return (*_wanted((gx, gl), ctx.needs_input_grad), None)


def _setup_gaussian(ctx, inputs, output):
    x, mean, logvar, event_dims = inputs
    ctx.save_for_backward(x, mean, logvar)
    ctx.event_dims = event_dims


def _backward_gaussian(ctx, grad):
    x, mean, logvar = ctx.saved_tensors
    gx, gm, glv = _ops._gaussian_log_prob_backward(
        grad, x, mean, logvar, ctx.event_dims, list(ctx.needs_input_grad[:3])
    )
    return (*_wanted((gx, gm, glv), ctx.needs_input_grad), None)


def _setup_kl(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, event_dims = inputs
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
    ctx.event_dims = event_dims


def _backward_kl(ctx, grad):
    mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
    grads = _ops._gaussian_kl_backward(
        grad, mu, logvar, prior_mu, prior_logvar, ctx.event_dims, list(ctx.needs_input_grad[:4])
    )
    return (*_wanted(grads, ctx.needs_input_grad), None)


def _setup_reparameterize(ctx, inputs, keyword_only_inputs, output):
    _, logvar, num_samples = inputs
    _, eps = output
    ctx.save_for_backward(logvar, eps)
    ctx.mark_non_differentiable(eps)
    ctx.one_sample = num_samples is None


def _backward_reparameterize(ctx, grad_z, grad_eps):
    logvar, eps = ctx.saved_tensors
    needs_mu, needs_logvar = ctx.needs_input_grad[:2]
    # One sample: dz/dmu = 1, so grad_z itself is mu's gradient (no copy is written).
    mask = [needs_mu and not ctx.one_sample, needs_logvar]
    gm = glv = None
    if any(mask):
        gm, glv = _ops._reparameterize_backward(grad_z, logvar, eps, mask)
    if ctx.one_sample:
        gm = grad_z
    return (*_wanted((gm, glv), ctx.needs_input_grad), None)


def _setup_elbo(ctx, inputs, output):
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, _ = inputs
    _, _, _, g_recon, g_obs, g_mu, g_logvar = output
    ctx.mark_non_differentiable(g_recon, g_obs, g_mu, g_logvar)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, recon, mu, logvar, obs_logvar, g_recon, g_obs, g_mu, g_logvar)
    ctx.likelihood, ctx.beta, ctx.reduction = likelihood, beta, reduction


def _is_exactly_one(t: torch.Tensor) -> bool:
    # A data-dependent check: only in eager mode (compiled graphs always scale).
    return not torch.compiler.is_compiling() and t.numel() == 1 and t.item() == 1


def _backward_elbo(ctx, grad_loss, grad_ll, grad_kl, *_):
    x, recon, mu, logvar, obs_logvar, g_recon, g_obs, g_mu, g_logvar = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_ll is None and grad_kl is None and ctx.reduction != "none" and not needs[0]:
        # The usual case: d(loss)/d(inputs) was computed in the forward pass.
        if grad_loss is None:
            return (None,) * 9
        if _is_exactly_one(grad_loss):
            scaled = (g_recon, g_mu, g_logvar, g_obs)
        else:
            scaled = tuple(g * grad_loss.to(g.dtype) for g in (g_recon, g_mu, g_logvar, g_obs))
        g_recon, g_mu, g_logvar, g_obs = scaled
        return (None, *_wanted((g_recon, g_mu, g_logvar, g_obs), needs[1:5]), *(None,) * 4)
    # General case (per-sample weights from reduction="none" or from gradients of the
    # returned log_likelihood / kl): one backward pass per term with per-row weights.
    batch = x.shape[0]
    opmath = V.opmath_dtype(x.dtype)
    row_loss = x.new_zeros((batch,), dtype=opmath)
    if grad_loss is not None:
        scale = 1.0 / max(batch, 1) if ctx.reduction == "mean" else 1.0
        row_loss = row_loss + grad_loss.to(opmath) * scale
    w_ll = -row_loss + (grad_ll.to(opmath) if grad_ll is not None else 0.0)
    w_kl = ctx.beta * row_loss + (grad_kl.to(opmath) if grad_kl is not None else 0.0)
    w_ll, w_kl = w_ll.to(x.dtype), w_kl.to(x.dtype)
    if ctx.likelihood == "bernoulli":
        gx, gr = _ops._bernoulli_log_prob_backward(
            w_ll, x, recon, x.dim() - 1, [needs[0], needs[1]]
        )
        gobs = None
    else:
        obs = obs_logvar if obs_logvar is not None else x.new_zeros(())
        gx, gr, gobs = _ops._gaussian_log_prob_backward(
            w_ll, x, recon, obs, x.dim() - 1, [needs[0], needs[1], needs[4]]
        )
    gmu, glv, _, _ = _ops._gaussian_kl_backward(
        w_kl, mu, logvar, None, None, mu.dim() - 1, [needs[2], needs[3], False, False]
    )
    return (*_wanted((gx, gr, gmu, glv, gobs), needs[:5]), *(None,) * 4)


def _no_double_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"vae_fast: {name} has no second derivative (double backward, e.g. "
            "create_graph=True for a gradient penalty); use vae_fast.backend('reference')"
        )

    return backward


# --------------------------------------------------------------------------- eager calls
# torch.library's generic autograd wrapper costs about 0.1 ms of Python per call: a
# third of the whole elbo at batch 256, most of gaussian_kl at 8192 x 32. In eager
# mode the public functions run each op under an autograd.Function built from the
# same setup_context and backward instead; compiled code (and a direct torch.ops
# call) goes through the registered autograd.

_EAGER: dict[str, type[torch.autograd.Function]] = {}


def _eager_function(op, setup_context, backward, keyword_only=()):
    """An autograd.Function running `op` with its registered autograd functions.
    `keyword_only` names the op's keyword-only arguments, passed last to apply()."""
    n_kw = len(keyword_only)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            positional = args[: len(args) - n_kw]
            kwargs = dict(zip(keyword_only, args[len(args) - n_kw :]))
            # Below the Autograd key, as torch.library's own wrapper calls the kernel.
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*positional, **kwargs)
            if keyword_only:
                setup_context(ctx, positional, kwargs, output)
            else:
                setup_context(ctx, positional, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return (*backward(ctx, *grads), *(None,) * n_kw)

    return EagerFunction


def _call(name: str, *args, **keyword_only):
    """torch.ops.vae_fast.<name>(*args, **keyword_only) with its registered autograd."""
    op = getattr(_ops, name)
    if torch.compiler.is_compiling():
        return op(*args, **keyword_only)
    needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs_grad and torch.is_grad_enabled():
        return _EAGER[name].apply(*args, *keyword_only.values())
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args, **keyword_only)


def _register_autograd() -> None:
    # The backward ops compute first derivatives only; differentiating through them
    # raises instead of silently treating them as constants.
    for name in (
        "_bernoulli_log_prob_backward",
        "_gaussian_log_prob_backward",
        "_gaussian_kl_backward",
        "_reparameterize_backward",
    ):
        torch.library.register_autograd(f"vae_fast::{name}", _no_double_backward(name))
    # Each op's autograd, registered with torch.library (compiled code, torch.ops
    # calls) and built into the Function that eager calls use (`_call`).
    for name, setup, backward, keyword_only in (
        ("bernoulli_log_prob", _setup_bernoulli, _backward_bernoulli, ()),
        ("gaussian_log_prob", _setup_gaussian, _backward_gaussian, ()),
        ("gaussian_kl", _setup_kl, _backward_kl, ()),
        ("reparameterize", _setup_reparameterize, _backward_reparameterize, ("generator",)),
        ("elbo", _setup_elbo, _backward_elbo, ()),
    ):
        torch.library.register_autograd(f"vae_fast::{name}", backward, setup_context=setup)
        _EAGER[name] = _eager_function(getattr(_ops, name), setup, backward, keyword_only)
    # Under autocast the losses run in float32, as torch's own losses do.
    for _name in ("bernoulli_log_prob", "gaussian_log_prob", "gaussian_kl", "elbo"):
        for _device in ("cpu", "cuda"):
            torch.library.register_autocast(f"vae_fast::{_name}", _device, torch.float32)


if _LOAD_ERROR is None:
    _register_fake_kernels()
    _register_autograd()
