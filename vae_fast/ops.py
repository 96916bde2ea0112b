"""The public vae_fast functions: typed wrappers over torch.ops.vae_fast.*.

The schemas live in csrc/ops.cpp and the kernels in csrc/cpu and csrc/cuda. Beside
each function sit its fake kernel (shapes and dtypes, for torch.compile and meta
tensors) and its autograd: a `setup_context` and a `backward`, registered through
`vae_fast._autograd.register` as the op's one autograd route (see that module for
how create_graph, torch.func and forward AD are served). Every public function goes
through `_public`, the one place that applies autocast and picks the fused op or
`vae_fast.reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from vae_fast import _autograd
from vae_fast import _validate as V
from vae_fast import reference

try:  # loading the compiled library registers the operators with torch
    from vae_fast import _C  # noqa: F401

    _LOAD_ERROR: ImportError | None = None
except ImportError as error:  # a source checkout that was never built
    _LOAD_ERROR = error

_ops = torch.ops.vae_fast
_F = TypeVar("_F", bound=Callable[..., Any])


def _require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            f"vae_fast's compiled extension (vae_fast._C) is not available ({_LOAD_ERROR}); "
            "build it with `make build` (or `pip install --no-build-isolation -e .`), "
            "or use `with vae_fast.backend('reference'):`"
        )


def _autocast(value: Any) -> Any:
    """Under autocast the losses run in float32, as torch's own losses do: half inputs
    become float32 (the usual mix is data in float32 and a decoder output in bfloat16,
    and the ops require one dtype); float64 stays float64."""
    if (
        isinstance(value, torch.Tensor)
        and value.dtype in V.HALF_DTYPES
        and torch.amp.is_autocast_available(value.device.type)
        and torch.is_autocast_enabled(value.device.type)
    ):
        return value.float()
    return value


def _public(reference_fn: Callable[..., Any], *, autocast: bool = True) -> Callable[[_F], _F]:
    """The backend switch, once for every public function: the fused op, or
    `reference_fn` (same signature) where `_autograd.runs_reference` says so."""

    def decorate(fused: _F) -> _F:
        @functools.wraps(fused)
        def public(*args: Any, **kwargs: Any) -> Any:
            if autocast:
                args = tuple(_autocast(a) for a in args)
                kwargs = {k: _autocast(v) for k, v in kwargs.items()}
            if _autograd.runs_reference(*args, *kwargs.values()):
                return reference_fn(*args, **kwargs)
            _require_extension()
            return fused(*args, **kwargs)

        return public  # type: ignore[return-value]

    return decorate


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _wanted(grads, needs) -> tuple[torch.Tensor | None, ...]:
    """The gradients autograd asked for; the ops return empty tensors for the others."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _batch_shape(x: torch.Tensor, event_dims: int) -> tuple[int, ...]:
    return tuple(x.shape[: x.dim() - event_dims])


def _like_or_empty(wanted: bool, like: torch.Tensor | None, fallback: torch.Tensor):
    return torch.empty_like(like) if wanted and like is not None else _empty_grad(fallback)


# --------------------------------------------------------------------------- bernoulli_log_prob


@_public(reference.bernoulli_log_prob)
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
    return _ops.bernoulli_log_prob(x, logits, k, V.resolve_validate_args(validate_args))


def _fake_bernoulli(x, logits, event_dims, validate_x=True):
    return x.new_empty(_batch_shape(x, event_dims))


def _fake_bernoulli_backward(grad, x, logits, event_dims, output_mask):
    return _like_or_empty(output_mask[0], x, x), _like_or_empty(output_mask[1], logits, x)


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
    gx, gl = _ops._bernoulli_log_prob_backward(grad, x, logits, ctx.event_dims, list(needs))
    return (*_wanted((gx, gl), needs), None, None)


# --------------------------------------------------------------------------- gaussian_log_prob


@_public(reference.gaussian_log_prob)
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
    return _ops.gaussian_log_prob(x, mean, logvar, k)


def _fake_gaussian(x, mean, logvar, event_dims):
    return x.new_empty(_batch_shape(x, event_dims))


def _fake_gaussian_backward(grad, x, mean, logvar, event_dims, output_mask):
    return tuple(_like_or_empty(m, t, x) for m, t in zip(output_mask, (x, mean, logvar)))


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
    grads = _ops._gaussian_log_prob_backward(grad, x, mean, logvar, ctx.event_dims, list(needs))
    return (*_wanted(grads, needs), None)


# --------------------------------------------------------------------------- gaussian_kl


@_public(reference.gaussian_kl)
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
    return _ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, k)


def _fake_kl(mu, logvar, prior_mu, prior_logvar, event_dims):
    return mu.new_empty(_batch_shape(mu, event_dims))


def _fake_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, event_dims, output_mask):
    like = (mu, logvar, prior_mu, prior_logvar)
    return tuple(_like_or_empty(m, t, mu) for m, t in zip(output_mask, like))


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
    grads = _ops._gaussian_kl_backward(grad, *saved, ctx.event_dims, list(needs))
    return (*_wanted(grads, needs), None)


# --------------------------------------------------------------------------- reparameterize


@_public(reference.reparameterize, autocast=False)
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
    V.check_reparameterize(mu, logvar, num_samples, eps)
    if eps is not None:  # nothing to draw: the same three elementwise ops in torch
        return reference.reparameterize(mu, logvar, eps=eps, num_samples=num_samples)
    z, _ = _ops.reparameterize(mu, logvar, num_samples, generator=generator)
    return z


def _fake_reparameterize(mu, logvar, num_samples=None, *, generator=None):
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    return mu.new_empty(shape), mu.new_empty(shape, dtype=V.opmath_dtype(mu.dtype))


def _fake_reparameterize_backward(grad_z, logvar, eps, output_mask):
    return tuple(_like_or_empty(m, logvar, logvar) for m in output_mask)


def _setup_reparameterize(ctx, inputs, output):
    mu, logvar, num_samples = inputs
    _, eps = output
    ctx.save_for_backward(mu, logvar, eps)
    ctx.mark_non_differentiable(eps)
    ctx.num_samples = num_samples


def _backward_reparameterize(ctx, grad_z, grad_eps):
    mu, logvar, eps = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():
        return _autograd.reference_vjp(
            lambda mu, logvar: (
                reference.reparameterize(mu, logvar, eps=eps, num_samples=ctx.num_samples),
            ),
            (mu, logvar),
            needs,
            (grad_z,),
        ) + (None,)
    one_sample = ctx.num_samples is None
    # One sample: dz/dmu = 1, so grad_z itself is mu's gradient (no copy is written).
    mask = [needs[0] and not one_sample, needs[1]]
    gm = glv = None
    if any(mask):
        gm, glv = _ops._reparameterize_backward(grad_z, logvar, eps, mask)
    if one_sample:
        gm = grad_z
    return (*_wanted((gm, glv), needs), None)


# --------------------------------------------------------------------------- elbo


@_public(reference.elbo)
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
            eager mode (torch.compile plans its own buffers).
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
    beta = V.check_beta(beta, x)
    validate = V.resolve_validate_args(validate_args)
    inputs = (x, recon, mu, logvar, obs_logvar, beta)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if inplace_grad and wants_grad and recon.requires_grad and not torch.compiler.is_compiling():
        V.check_inplace_grad_layout(recon, reduction)
        V.check_inplace_grad_autograd(x, recon)
        loss, ll, kl, *_ = _ops._elbo_into_recon(
            x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, validate
        )
        return loss, ll, kl
    # With reduction="none" the gradient depends on grad_output per row, so the
    # forward pass has nothing to precompute: backward runs one pass per term.
    compute_grad = wants_grad and reduction != "none"
    loss, ll, kl, *_ = _ops.elbo(
        x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate
    )
    return loss, ll, kl


def _fake_elbo(
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate_x=True
):
    V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
    batch = x.shape[0]
    return (
        x.new_empty((batch,) if reduction == "none" else ()),
        x.new_empty((batch,)),
        x.new_empty((batch,)),
        _like_or_empty(compute_grad, recon, x),
        _like_or_empty(compute_grad, obs_logvar, x),
        _like_or_empty(compute_grad, mu, x),
        _like_or_empty(compute_grad, logvar, x),
    )


def _fake_elbo_into_recon(
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, validate_x=True
):
    V.check_inplace_grad_layout(recon, reduction)
    outputs = _fake_elbo(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, True)
    loss, ll, kl, _, g_obs, g_mu, g_logvar = outputs
    return loss, ll, kl, g_obs, g_mu, g_logvar


def _elbo_reference(ctx):
    """elbo's reference as a function of its six differentiable inputs."""

    def loss_ll_kl(x, recon, mu, logvar, obs_logvar, beta):
        return reference.elbo(
            recon,
            x,
            mu,
            logvar,
            likelihood=ctx.likelihood,
            obs_logvar=obs_logvar,
            beta=beta,
            reduction=ctx.reduction,
            validate_args=False,
        )

    return loss_ll_kl


def _setup_elbo(ctx, inputs, output):
    x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, _ = inputs
    _, _, kl, g_recon, g_obs, g_mu, g_logvar = output
    ctx.mark_non_differentiable(g_recon, g_obs, g_mu, g_logvar)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, recon, mu, logvar, obs_logvar, beta, kl, g_recon, g_mu, g_logvar, g_obs)
    ctx.likelihood, ctx.reduction, ctx.has_fused_grads = likelihood, reduction, compute_grad


def _is_exactly_one(t: torch.Tensor) -> bool:
    # Reading a value is free on CPU; elsewhere it is a host sync, so never read there.
    # (Compiled graphs always scale: the check depends on data.)
    return (
        t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and t.numel() == 1
        and t.item() == 1
    )


def _hand_back(grads, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Saved gradients times grad_output. When the graph is freed after this backward
    they are scaled in place and handed over as they are (no copy); when it is
    retained, as new tensors the caller owns, so that clipping them in place cannot
    change what a later backward reads."""
    keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
    one = _is_exactly_one(grad_output)
    out = []
    for g in grads:
        if g is not None and not one:
            scale = grad_output.to(g.dtype)
            g = g * scale if keep_graph else g.mul_(scale)
        elif g is not None and keep_graph:
            g = g.clone()
        out.append(g)
    return tuple(out)


def _backward_elbo(ctx, grad_loss, grad_ll, grad_kl, *_):
    x, recon, mu, logvar, obs_logvar, beta, kl, *fused = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # a recorded backward: the reference's, to any order
        inputs = (x, recon, mu, logvar, obs_logvar, beta)
        grads = _autograd.reference_vjp(
            _elbo_reference(ctx), inputs, needs[:5] + needs[6:7], (grad_loss, grad_ll, grad_kl)
        )
        gx, gr, gmu, glv, gobs, gbeta = grads
        return gx, gr, gmu, glv, gobs, None, gbeta, None, None, None
    g_beta = _beta_gradient(ctx, kl, beta, grad_loss) if needs[6] else None
    only_loss = grad_ll is None and grad_kl is None and ctx.reduction != "none"
    if ctx.has_fused_grads and only_loss and not needs[0]:
        # The usual case: d(loss)/d(inputs) was computed in the forward pass.
        if grad_loss is None:
            return (None,) * 6 + (g_beta, None, None, None)
        grads = _hand_back(_wanted(fused, needs[1:5]), grad_loss)
        return (None, *grads, None, g_beta, None, None, None)
    gx, gr, gmu, glv, gobs = _elbo_general_backward(
        ctx, x, recon, mu, logvar, obs_logvar, beta, grad_loss, grad_ll, grad_kl
    )
    return gx, gr, gmu, glv, gobs, None, g_beta, None, None, None


def _beta_gradient(ctx, kl, beta, grad_loss):
    """d(loss)/d(beta) = the reduced KL; the returned kl and log_likelihood do not
    depend on beta."""
    if grad_loss is None:
        return None
    opmath = V.opmath_dtype(kl.dtype)
    weighted = kl.to(opmath) * grad_loss.to(opmath)
    g = weighted.mean() if ctx.reduction == "mean" else weighted.sum()
    return g.to(device=beta.device, dtype=beta.dtype)


def _elbo_general_backward(ctx, x, recon, mu, logvar, obs_logvar, beta, grad_loss, grad_ll, grad_kl):
    """Per-row weights (from reduction="none", or gradients of the returned
    log_likelihood / kl): one backward pass per term that has a weight; a term that
    receives none gives its inputs no gradient (None, not zeros)."""
    needs = ctx.needs_input_grad
    batch = x.shape[0]
    opmath = V.opmath_dtype(x.dtype)
    per_row = None
    if grad_loss is not None:
        scale = 1.0 / max(batch, 1) if ctx.reduction == "mean" else 1.0
        per_row = (grad_loss.to(opmath) * scale).expand(batch)
    w_ll = _add(None if per_row is None else -per_row, grad_ll, opmath)
    w_kl = _add(None if per_row is None else beta.to(opmath) * per_row, grad_kl, opmath)
    gx = gr = gmu = glv = gobs = None
    if w_ll is not None and (needs[0] or needs[1] or needs[4]):
        w_ll = w_ll.to(x.dtype)
        if ctx.likelihood == "bernoulli":
            gx, gr = _ops._bernoulli_log_prob_backward(w_ll, x, recon, x.dim() - 1, [needs[0], needs[1]])
        else:
            obs = obs_logvar if obs_logvar is not None else x.new_zeros(())
            gx, gr, gobs = _ops._gaussian_log_prob_backward(
                w_ll, x, recon, obs, x.dim() - 1, [needs[0], needs[1], needs[4]]
            )
    if w_kl is not None and (needs[2] or needs[3]):
        gmu, glv, _, _ = _ops._gaussian_kl_backward(
            w_kl.to(x.dtype), mu, logvar, None, None, mu.dim() - 1, [needs[2], needs[3], False, False]
        )
    return _wanted((gx, gr, gmu, glv, gobs), needs[:5])


def _add(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if b is not None:
        b = b.to(dtype)
    if a is None:
        return b
    return a if b is None else a + b


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
    g_beta = _beta_gradient(ctx, kl, beta, grad_loss) if needs[6] else None
    if grad_loss is None:
        return (None,) * 6 + (g_beta, None, None)
    grads = _hand_back(_wanted(fused, needs[1:5]), grad_loss)
    return (None, *grads, None, g_beta, None, None)


# --------------------------------------------------------------------------- registration


def _register() -> None:
    for name, fake in (
        ("bernoulli_log_prob", _fake_bernoulli),
        ("_bernoulli_log_prob_backward", _fake_bernoulli_backward),
        ("gaussian_log_prob", _fake_gaussian),
        ("_gaussian_log_prob_backward", _fake_gaussian_backward),
        ("gaussian_kl", _fake_kl),
        ("_gaussian_kl_backward", _fake_kl_backward),
        ("reparameterize", _fake_reparameterize),
        ("_reparameterize_backward", _fake_reparameterize_backward),
        ("elbo", _fake_elbo),
        ("_elbo_into_recon", _fake_elbo_into_recon),
    ):
        torch.library.register_fake(f"vae_fast::{name}", fake)
    for name, setup, backward in (
        ("bernoulli_log_prob", _setup_bernoulli, _backward_bernoulli),
        ("gaussian_log_prob", _setup_gaussian, _backward_gaussian),
        ("gaussian_kl", _setup_kl, _backward_kl),
        ("reparameterize", _setup_reparameterize, _backward_reparameterize),
        ("elbo", _setup_elbo, _backward_elbo),
        ("_elbo_into_recon", _setup_elbo_into_recon, _backward_elbo_into_recon),
    ):
        _autograd.register(name, setup, backward)
    for name in (
        "_bernoulli_log_prob_backward",
        "_gaussian_log_prob_backward",
        "_gaussian_kl_backward",
        "_reparameterize_backward",
    ):
        _autograd.register_first_order_only(name)
    # Direct torch.ops calls under autocast: half inputs in float32 (float64 is kept).
    for name in ("bernoulli_log_prob", "gaussian_log_prob", "gaussian_kl", "elbo"):
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(f"vae_fast::{name}", device, torch.float32)


if _LOAD_ERROR is None:
    _register()
