"""vae_fast.elbo against torch.distributions and against vae_fast.reference.

The fused op computes d(loss)/d(inputs) in its forward pass; backward scales those
saved gradients (or returns them untouched when grad_output is exactly 1). The
other backward route (per-sample weights from reduction="none" or from gradients
of the returned log_likelihood / kl) runs the single-op backward kernels. Both are
checked here, each against autograd through torch.distributions in fp64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import (
    DEVICES,
    EXACT_DTYPES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    HAS_CUDA,
    assert_close_dtype,
    assert_close_exact,
    cast,
    fp64,
    leaf,
    make,
    truth_elbo,
)

import vae_fast

op = vae_fast.elbo
NAMES = ("x", "recon", "mu", "logvar", "obs_logvar")


def inputs(
    x_shape,
    z_shape,
    dtype,
    device,
    gen,
    *,
    likelihood="bernoulli",
    obs_shape=None,
    grad=("recon", "mu", "logvar", "obs_logvar"),
    layouts=None,
    soft=False,
):
    layouts = layouts or {}
    lay = lambda name: layouts.get(name, "contiguous")  # noqa: E731
    if likelihood == "bernoulli":
        x = make(
            x_shape,
            dtype,
            device,
            lay("x"),
            kind="uniform" if soft else "binary",
            low=0.0,
            high=1.0,
            gen=gen,
        )
        recon = make(x_shape, dtype, device, lay("recon"), kind="normal", high=3.0, gen=gen)
    else:
        x = make(x_shape, dtype, device, lay("x"), kind="normal", gen=gen)
        recon = make(x_shape, dtype, device, lay("recon"), kind="normal", gen=gen)
    mu = make(z_shape, dtype, device, lay("mu"), kind="normal", gen=gen)
    logvar = make(z_shape, dtype, device, lay("logvar"), low=-3.0, high=2.0, gen=gen)
    obs = None
    if obs_shape is not None:
        obs = make(
            obs_shape,
            dtype,
            device,
            lay("obs_logvar") if obs_shape else "contiguous",
            low=-1.0,
            high=1.0,
            gen=gen,
        )
    ins = {"x": x, "recon": recon, "mu": mu, "logvar": logvar, "obs_logvar": obs}
    return {k: None if v is None else leaf(v, k in grad) for k, v in ins.items()}


def call(fn, ins, **kw):
    return fn(ins["recon"], ins["x"], ins["mu"], ins["logvar"], obs_logvar=ins["obs_logvar"], **kw)


def truth(recon, x, mu, logvar, obs_logvar=None, **kw):  # the public elbo's order
    return truth_elbo(x, recon, mu, logvar, obs_logvar=obs_logvar, **kw)


# Which outputs receive a gradient, and what it is: "one" is exactly 1 (loss.backward()),
# a float is a constant, "rand" a random tensor.
COMBOS = {
    "loss": {"loss": "one"},  # the usual loss.backward(): saved gradients, unscaled
    "3*loss": {"loss": 3.0},  # grad_output != 1 scales the saved gradients
    "loss+ll": {"loss": "one", "ll": "one"},  # (loss + ll.sum()).backward(): the general route
    "ll": {"ll": "rand"},  # only through the returned log-likelihood
    "kl": {"kl": "rand"},  # only through the returned KL
    "all": {"loss": "rand", "ll": "rand", "kl": "rand"},
}


def _grad_outputs(outs, combo, gen):
    picked, grads = [], []
    for i, name in enumerate(("loss", "ll", "kl")):
        spec = COMBOS[combo].get(name)
        if spec is None:
            continue
        o = outs[i]
        if spec == "one":
            g = torch.ones_like(o)
        elif spec == "rand":
            g = torch.randn(o.shape, dtype=torch.float64, generator=gen).to(o.dtype).to(o.device)
        else:
            g = torch.full_like(o, spec)
        picked.append(i)
        grads.append(g)
    return picked, grads


def check_elbo(ins, dtype, gen, *, combo="loss", **kw):
    """Values of (loss, ll, kl) and the gradients of every input that requires grad, for the
    outputs and grad_outputs of `combo`, against torch.distributions in fp64 (and eager torch
    in the same dtype for half types). Returns the op's outputs."""
    outs = call(op, ins, **kw)
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]
    batch = ins["x"].shape[0]
    assert outs[1].shape == (batch,) and outs[2].shape == (batch,)
    assert outs[0].shape == ((batch,) if kw.get("reduction") == "none" else ())
    leaves = [n for n in NAMES if ins[n] is not None and ins[n].requires_grad]
    picked, gouts = _grad_outputs(outs, combo, gen)
    got = (
        torch.autograd.grad(
            [outs[i] for i in picked], [ins[n] for n in leaves], gouts, allow_unused=True
        )
        if leaves
        else ()
    )

    def reference_grads(fn_ins, dt):
        ref = call(truth, fn_ins, **kw)
        gs = (
            torch.autograd.grad(
                [ref[i] for i in picked],
                [fn_ins[n] for n in leaves],
                [g.to(dt) for g in gouts],
                allow_unused=True,
            )
            if leaves
            else ()
        )
        return ref, gs

    want, want_g = reference_grads({k: fp64(v) for k, v in ins.items()}, torch.float64)
    eager = eager_g = (None,) * 5
    if dtype in HALF_DTYPES:
        eager, eager_g = reference_grads({k: cast(v, dtype) for k, v in ins.items()}, dtype)
    for name, o, w, e in zip(("loss", "log_likelihood", "kl"), outs, want, eager):
        assert_close_dtype(o, w, dtype, eager=e, what=name)
    for name, g, w, e in zip(leaves, got, want_g, eager_g):
        if w is None:  # no path from the picked outputs to this input: no gradient
            assert g is None or not g.any(), f"grad of {name} should be zero"
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.shape == ins[name].shape and g.dtype == dtype, (name, g.shape, g.dtype)
        assert_close_dtype(g, w, dtype, eager=e, what=f"grad of {name}")
    return outs


# (x shape, z shape): the batch is the first dim of both.
SHAPES = [
    ((1, 1), (1, 1)),  # one sample, one pixel, one latent
    ((7, 13), (7, 3)),  # odd sizes everywhere
    ((3, 5, 17), (3, 2, 5)),  # image-like x and a 2-d latent: sums over all but the batch dim
    ((257, 1000), (257, 32)),  # several vectors / chunks per row, an odd batch
]


# The value path: every dtype on every shape, both likelihoods (the default reduction).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("x_shape, z_shape", SHAPES)
def test_matches_distributions(device, dtype, likelihood, x_shape, z_shape, gen):
    ins = inputs(x_shape, z_shape, dtype, device, gen, likelihood=likelihood)
    check_elbo(ins, dtype, gen, likelihood=likelihood)


# Reductions on one shape (odd sizes): how the rows combine does not depend on the shape.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(device, dtype, likelihood, reduction, gen):
    ins = inputs((7, 13), (7, 3), dtype, device, gen, likelihood=likelihood)
    check_elbo(ins, dtype, gen, likelihood=likelihood, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_grad_routes(device, dtype, combo, likelihood, gen):
    obs = (13,) if likelihood == "gaussian" else None
    ins = inputs((9, 13), (9, 4), dtype, device, gen, likelihood=likelihood, obs_shape=obs)
    check_elbo(ins, dtype, gen, combo=combo, likelihood=likelihood)
    check_elbo(ins, dtype, gen, combo=combo, likelihood=likelihood, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "obs_shape",
    [
        None,  # None means logvar 0 (unit variance)
        (),  # one learnable scalar variance
        (13,),  # per feature
        (1, 13),  # per feature, batch dim kept as 1
        (6, 13),  # per element (e.g. predicted by the decoder)
        (6, 1),  # per sample
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_obs_logvar(device, dtype, obs_shape, reduction, gen):
    ins = inputs((6, 13), (6, 5), dtype, device, gen, likelihood="gaussian", obs_shape=obs_shape)
    check_elbo(ins, dtype, gen, likelihood="gaussian", reduction=reduction)
    check_elbo(ins, dtype, gen, combo="all", likelihood="gaussian", reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_obs_logvar_image_shape(device, gen):
    # x of shape (B, C, H, W) with a per-channel or per-pixel observation variance.
    for obs_shape in [(3, 1, 1), (4, 5), (3, 4, 5)]:
        ins = inputs(
            (2, 3, 4, 5),
            (2, 6),
            torch.float64,
            device,
            gen,
            likelihood="gaussian",
            obs_shape=obs_shape,
        )
        check_elbo(ins, torch.float64, gen, likelihood="gaussian")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.25, 4.0])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_beta(device, dtype, beta, likelihood, gen):
    ins = inputs((8, 21), (8, 6), dtype, device, gen, likelihood=likelihood)
    check_elbo(ins, dtype, gen, beta=beta, likelihood=likelihood)
    check_elbo(ins, dtype, gen, combo="all", beta=beta, likelihood=likelihood, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "grad",
    [
        ("recon",),
        ("mu",),
        ("logvar",),
        ("obs_logvar",),
        ("mu", "logvar"),
        ("x", "recon"),  # x requiring grad leaves the saved-gradient route
        ("x",),
    ],
    ids=lambda g: "+".join(g),
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_grad_subsets(device, dtype, grad, likelihood, gen):
    if "obs_logvar" in grad and likelihood == "bernoulli":
        pytest.skip("obs_logvar is a Gaussian parameter")
    obs = (11,) if likelihood == "gaussian" else None
    ins = inputs(
        (5, 11),
        (5, 3),
        dtype,
        device,
        gen,
        likelihood=likelihood,
        obs_shape=obs,
        grad=grad,
        soft=True,
    )
    check_elbo(ins, dtype, gen, likelihood=likelihood)
    check_elbo(ins, dtype, gen, combo="3*loss", likelihood=likelihood, reduction="sum")
    loss, _, _ = call(op, ins, likelihood=likelihood)
    loss.backward()
    for name in NAMES:
        if ins[name] is not None:
            assert (ins[name].grad is not None) == (name in grad), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "layouts",
    [
        {"x": "transposed", "recon": "transposed", "mu": "transposed", "logvar": "transposed"},
        {"x": "strided", "recon": "contiguous", "mu": "strided", "logvar": "contiguous"},
        {"x": "expanded", "recon": "strided", "mu": "contiguous", "logvar": "expanded"},
        {"obs_logvar": "strided", "recon": "transposed", "logvar": "strided"},
        {"obs_logvar": "expanded", "x": "transposed"},
    ],
    ids=lambda d: "-".join(f"{k}:{v[:5]}" for k, v in d.items()),
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_layouts(device, dtype, layouts, likelihood, gen):
    obs = (7, 13) if likelihood == "gaussian" else None
    ins = inputs(
        (7, 13), (7, 5), dtype, device, gen, likelihood=likelihood, obs_shape=obs, layouts=layouts
    )
    check_elbo(ins, dtype, gen, likelihood=likelihood)
    check_elbo(ins, dtype, gen, combo="all", likelihood=likelihood)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_soft_targets(device, dtype, gen):
    ins = inputs((10, 40), (10, 8), dtype, device, gen, soft=True)
    check_elbo(ins, dtype, gen)
    check_elbo(ins, dtype, gen, combo="all", reduction="sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_extremes(device, dtype, gen):
    # logits of +-1e4, latent logvar of +-80, and an observation logvar of +-80.
    ins = inputs((4, 16), (4, 6), dtype, device, gen, soft=True)
    with torch.no_grad():
        ins["recon"].copy_(torch.tensor([1e4, -1e4], dtype=dtype).repeat(32).reshape(4, 16))
        ins["logvar"].copy_(torch.tensor([80.0, -80.0, 0.0], dtype=dtype).repeat(8).reshape(4, 6))
    outs = check_elbo(ins, dtype, gen)
    assert all(torch.isfinite(o).all() for o in outs)
    check_elbo(ins, dtype, gen, combo="all", reduction="none")

    ins = inputs((4, 16), (4, 6), dtype, device, gen, likelihood="gaussian", obs_shape=(16,))
    with torch.no_grad():
        ins["obs_logvar"].copy_(torch.tensor([80.0, -80.0], dtype=dtype).repeat(8))
        ins["x"].copy_(ins["recon"] + 1e-17 * ins["x"])  # residuals tiny enough for logvar=-80
    outs = check_elbo(ins, dtype, gen, likelihood="gaussian")
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_recon_gives_a_nan_loss(device):
    # All-zero targets: the x*l term vanishes, so only the log1p/sigmoid path can carry the
    # NaN (on AVX-512 a vrangeps clamp once turned it into a finite loss and gradient).
    x = torch.zeros(3, 37, device=device)
    recon = torch.full((3, 37), float("nan"), device=device, requires_grad=True)
    mu = logvar = torch.zeros(3, 4, device=device)
    loss, ll, _ = vae_fast.elbo(recon, x, mu, logvar)
    loss.backward()
    assert loss.isnan() and ll.isnan().all() and recon.grad.isnan().all()


# An empty batch: one exact and one half dtype (the accumulation path differs).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_empty_batch(device, dtype, reduction, likelihood, gen):
    obs = (5,) if likelihood == "gaussian" else None
    ins = inputs((0, 5), (0, 3), dtype, device, gen, likelihood=likelihood, obs_shape=obs)
    # A learnable beta too: d(loss)/d(beta) over no rows is 0, even where the mean is nan.
    beta = torch.tensor(0.5, device=device, requires_grad=True)
    loss, ll, kl = call(op, ins, likelihood=likelihood, reduction=reduction, beta=beta)
    assert ll.shape == (0,) and kl.shape == (0,)
    if reduction == "none":
        assert loss.shape == (0,)
    elif reduction == "sum":
        assert loss.shape == () and loss.item() == 0
    else:  # the mean of nothing, as torch's own losses give it
        assert loss.shape == () and torch.isnan(loss)
    leaves = [ins[n] for n in NAMES if ins[n] is not None and ins[n].requires_grad] + [beta]
    grads = torch.autograd.grad(loss.sum(), leaves)
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_no_grad(device, likelihood, gen):
    ins = inputs((6, 20), (6, 4), torch.float32, device, gen, likelihood=likelihood)
    want = call(op, ins, likelihood=likelihood)
    with torch.no_grad():
        outs = call(op, ins, likelihood=likelihood)
    for o, w in zip(outs, want):
        assert o.grad_fn is None and not o.requires_grad
        torch.testing.assert_close(o, w.detach(), rtol=0, atol=0)
    # inputs that do not require grad: no graph either
    plain = {k: None if v is None else v.detach() for k, v in ins.items()}
    for o, w in zip(call(op, plain, likelihood=likelihood), want):
        assert o.grad_fn is None
        torch.testing.assert_close(o, w.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_repeated(device, gen):
    # With retain_graph the saved gradients are handed out again: they must not have been
    # accumulated into (three backwards give three times the gradient).
    ins = inputs((5, 12), (5, 3), torch.float64, device, gen)
    loss, _, _ = call(op, ins)
    for _ in range(3):
        loss.backward(retain_graph=True)
    ref_ins = {k: fp64(v) for k, v in ins.items()}
    ref_loss = call(truth, ref_ins)[0]
    ref_grads = torch.autograd.grad(ref_loss, [ref_ins[n] for n in ("recon", "mu", "logvar")])
    for n, w in zip(("recon", "mu", "logvar"), ref_grads):
        assert_close_exact(ins[n].grad, 3 * w, 1e-10, what=f"grad of {n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_fused_matches_reference_in_a_model(device, dtype, likelihood, vae_backend, gen):
    # A small encoder/decoder: gradients reach the weights through recon, mu and logvar,
    # and the public function agrees with `vae_fast.backend("reference")`.
    torch.manual_seed(0)
    D, Z, H = 24, 4, 16
    enc = torch.nn.Linear(D, 2 * Z).to(device, dtype)
    dec = torch.nn.Linear(Z, D).to(device, dtype)
    obs = torch.zeros(D, dtype=dtype, device=device, requires_grad=True)
    x = make((H, D), dtype, device, low=0.0, high=1.0, gen=gen)
    params = [*enc.parameters(), *dec.parameters(), obs]
    eps = torch.randn(H, Z, dtype=dtype, generator=gen).to(device)

    def step(backend):
        with vae_fast.backend(backend):
            mu, logvar = enc(x).chunk(2, dim=-1)
            z = vae_fast.reparameterize(mu, logvar, eps=eps)  # one eps for both backends
            kw = {"obs_logvar": obs} if likelihood == "gaussian" else {}
            loss, ll, kl = vae_fast.elbo(
                dec(z), x, mu, logvar, likelihood=likelihood, beta=0.5, **kw
            )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss, grads

    loss_f, grads_f = step(vae_backend)
    loss_r, grads_r = step("reference")
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close_exact(loss_f, loss_r, rtol, what="loss")
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        if gr is None:
            assert gf is None
            continue
        assert_close_exact(gf, gr, rtol, what=f"grad of parameter {i}")


# --------------------------------------------------------------------------- bad input


def _ok():  # (recon, x, mu, logvar), the public order
    return torch.randn(3, 8), torch.rand(3, 8), torch.randn(3, 2), torch.randn(3, 2)


_A, _M = torch.zeros(4, 6), torch.zeros(4, 2)
# A None where a tensor is required (only obs_logvar and the priors may be None).
NONE_CALLS = {
    "elbo-recon": (lambda: vae_fast.elbo(None, _A, _M, _M), "recon"),
    "gaussian_log_prob-logvar": (lambda: vae_fast.gaussian_log_prob(_A, _A, None), "logvar"),
    "gaussian_kl-logvar": (lambda: vae_fast.gaussian_kl(_M, None), "logvar"),
    "reparameterize-logvar": (lambda: vae_fast.reparameterize(_M, None), "logvar"),
    "iwae-z": (lambda: vae_fast.iwae(_A[None], _A, None, _M, _M), "z"),
    "iwae_sample-logvar": (lambda: vae_fast.iwae_sample(_M, None, 2), "logvar"),
}


@pytest.mark.parametrize("call, name", NONE_CALLS.values(), ids=NONE_CALLS.keys())
def test_none_for_a_required_tensor_names_it(call, name):
    with pytest.raises(TypeError, match=f"`{name}` must be a torch.Tensor, got NoneType"):
        call()


def test_unknown_likelihood():
    with pytest.raises(
        ValueError,
        match=re.escape("unknown likelihood 'poisson'; expected one of 'bernoulli', 'gaussian'"),
    ):
        op(*_ok(), likelihood="poisson")


def test_unknown_reduction():
    with pytest.raises(
        ValueError,
        match=re.escape("unknown reduction 'avg'; expected one of 'mean', 'sum', 'none'"),
    ):
        op(*_ok(), reduction="avg")


def test_mismatched_shapes():
    recon, x, mu, logvar = _ok()
    with pytest.raises(ValueError, match=r"`recon` has shape \(3, 7\) but `x` has shape \(3, 8\)"):
        op(recon[:, :7], x, mu, logvar)
    with pytest.raises(
        ValueError, match=r"`logvar` has shape \(3, 3\) but `mu` has shape \(3, 2\)"
    ):
        op(recon, x, mu, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"`mu` has batch size 2 \(shape \(2, 2\)\) but `x` has 3"):
        op(recon, x, mu[:2], logvar[:2])


def test_missing_batch_dim():
    with pytest.raises(ValueError, match=r"`x` and `mu` need a leading batch dim"):
        op(torch.tensor(0.1), torch.tensor(0.5), torch.zeros(1, 2), torch.zeros(1, 2))


def test_obs_logvar_with_bernoulli():
    with pytest.raises(ValueError, match=r"`obs_logvar` is only used with likelihood='gaussian'"):
        op(*_ok(), obs_logvar=torch.zeros(()))


def test_obs_logvar_not_broadcastable():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`obs_logvar` has shape (3,), which does not broadcast to `x`'s shape (3, 8)"
        ),
    ):
        op(*_ok(), likelihood="gaussian", obs_logvar=torch.zeros(3))


@pytest.mark.parametrize("name", ["x", "recon", "mu", "logvar"])
def test_integer_dtype(name):
    args = dict(zip(("recon", "x", "mu", "logvar"), _ok()))
    args[name] = args[name].to(torch.int64)
    with pytest.raises(TypeError, match=rf"`{name}` has dtype torch.int64; expected a floating"):
        op(*args.values())


# A sparse tensor is refused by name (the dispatcher's own error names only the op), and
# a yes/no option must be a bool ("no" would read as true).
@pytest.mark.parametrize("name", ["x", "recon"])
def test_sparse_input(name):
    args = dict(zip(("recon", "x", "mu", "logvar"), _ok()))
    args[name] = args[name].to_sparse()
    with pytest.raises(
        TypeError, match=rf"`{name}` is a torch.sparse_coo tensor; expected a dense"
    ):
        op(*args.values())


def test_inplace_grad_must_be_a_bool():
    with pytest.raises(TypeError, match=r"`inplace_grad` must be a bool, got 'no'"):
        op(*_ok(), inplace_grad="no")


def test_mixed_dtypes():
    recon, x, mu, logvar = _ok()
    with pytest.raises(TypeError, match=r"`mu` has dtype torch.float64 but `x` has torch.float32"):
        op(recon, x, mu.double(), logvar.double())
    with pytest.raises(
        TypeError, match=r"`obs_logvar` has dtype torch.bfloat16 but `x` has torch.float32"
    ):
        op(
            recon,
            x,
            mu,
            logvar,
            likelihood="gaussian",
            obs_logvar=torch.zeros((), dtype=torch.bfloat16),
        )


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mixed_devices():
    recon, x, mu, logvar = _ok()
    with pytest.raises(ValueError, match=r"`mu` is on cuda:0 but `x` is on cpu"):
        op(recon, x, mu.cuda(), logvar.cuda())


def test_argument_order_is_recon_then_x():
    # The public order is (recon, x, mu, logvar), as in torch's losses (input, target) and
    # pytorch/examples' loss_function(recon_x, x, mu, logvar): positional and keyword
    # calls agree, and recon is read as the logits, x as the targets.
    gen = torch.Generator().manual_seed(0)
    recon = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    x = torch.rand(3, 7, dtype=torch.float64, generator=gen).round()
    mu, logvar = (torch.randn(3, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    got = vae_fast.elbo(recon, x, mu, logvar, reduction="sum")
    by_name = vae_fast.elbo(recon=recon, x=x, mu=mu, logvar=logvar, reduction="sum")
    ll = torch.distributions.Bernoulli(logits=recon).log_prob(x).sum(-1)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)
    for g, n, w in zip(got, by_name, ((kl - ll).sum(), ll, kl)):
        torch.testing.assert_close(g, n, rtol=0, atol=0)
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_deterministic(likelihood, gen):
    # Same inputs, same bits: the parallel row sums do not depend on scheduling. And the
    # result does not depend on the thread count beyond rounding.
    obs = (1000,) if likelihood == "gaussian" else None
    ins = inputs(
        (257, 1000), (257, 32), torch.float32, "cpu", gen, likelihood=likelihood, obs_shape=obs
    )
    leaves = [ins[n] for n in NAMES if ins[n] is not None and ins[n].requires_grad]

    def run():
        outs = call(op, ins, likelihood=likelihood)
        return (*outs, *torch.autograd.grad(outs[0], leaves))

    first = run()
    for a, b in zip(first, run()):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert_close_exact(a, b, 2e-5)


def test_large_gradient_buffers(gen):
    # Gradients of 128 KiB and more come from vae_fast's output allocator on CPU (from
    # 32 MiB on huge pages): check them against the reference, use them as ordinary
    # tensors (in-place updates, accumulation), and reallocate them a few times.
    B, D = 2048, 4100  # a float32 gradient of 33.6 MB
    likelihood = "bernoulli"  # the allocation is shared by every kernel that writes one
    ins = inputs((B, D), (B, 8), torch.float32, "cpu", gen, likelihood=likelihood)
    with vae_fast.backend("reference"):
        ref = call(op, ins, likelihood=likelihood)
        (ref_grad,) = torch.autograd.grad(ref[0], [ins["recon"]])
    outs = call(op, ins, likelihood=likelihood)
    (first,) = torch.autograd.grad(outs[0], [ins["recon"]])
    assert first.shape == (B, D) and first.is_contiguous()
    for o, r in zip(outs, ref):
        assert_close_exact(o, r, 2e-5)
    assert_close_exact(first, ref_grad, 2e-5)
    pointers = []
    for _ in range(3):  # new gradients each time, same bits
        call(op, ins, likelihood=likelihood)[0].backward()
        g = ins["recon"].grad
        assert torch.equal(g, first)
        g.mul_(2)  # an ordinary, writable tensor
        assert torch.equal(g, 2 * first)
        pointers.append(g.data_ptr())
        ins["recon"].grad = None
        del g
    # A freed block is reused for the next gradient (no page faults in a training
    # loop), never while a gradient still lives in it (`first` does, throughout).
    assert pointers[1] == pointers[2]
    assert first.data_ptr() not in pointers
    call(op, ins, likelihood=likelihood)[0].backward()
    call(op, ins, likelihood=likelihood)[0].backward()  # accumulates into the first buffer
    assert torch.equal(ins["recon"].grad, 2 * first)


# 1 MiB gradients, and 401 KB ones (a 128 x 784 batch: above glibc's mmap threshold,
# where each fresh block would cost a page fault per 4 KiB, the kernel's time again).
@pytest.mark.parametrize("shape", [(2048, 128), (128, 784)])
def test_a_training_step_reuses_its_gradient_blocks(gen, shape):
    # recon's, mu's and logvar's gradients are freed together by
    # zero_grad(set_to_none=True) and allocated together by the next step: each must
    # come back from the allocator's cache (no fresh pages), not evict the others, nor
    # go to the step's other temporaries of the same size, which would take the memory
    # over from glibc's heap.
    B, D = shape
    ins = inputs((B, D), (B, D), torch.float32, "cpu", gen)
    leaves = [ins["recon"], ins["mu"], ins["logvar"]]

    def step():
        for t in leaves:
            t.grad = None
        temporaries = [torch.ones(B, D) for _ in range(3)]  # a decoder's activations
        call(op, ins)[0].backward()
        del temporaries
        return {t.grad.data_ptr() for t in leaves}

    step()
    first = step()
    assert step() == first


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_saturated_logits_gradient(device, dtype, reduction):
    # At logits of +-1e4 sigmoid is exactly 1 or 0 in every dtype, so d(loss)/d(recon) is
    # exactly 0 where the target agrees and exactly -+1 where it disagrees (as in eager
    # torch): the saved-gradient route and the per-sample one ("none") alike.
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5]], dtype=dtype, device=device)
    recon = torch.tensor([[1e4, -1e4, 1e4, -1e4, 1e4, -1e4]], dtype=dtype, device=device)
    recon.requires_grad_(True)
    zeros = torch.zeros(1, 2, dtype=dtype, device=device)
    loss, _, _ = op(recon, x, zeros, zeros, reduction=reduction)
    (g,) = torch.autograd.grad(loss.sum(), recon)
    want = torch.tensor([[0.0, 0.0, 1.0, -1.0, 0.5, -0.5]], dtype=dtype, device=device)
    assert torch.equal(g, want), g


# The loss of half inputs is formed from ll and kl in float32, and rounded once: rows
# rounded to bf16/fp16 first lose a loss where beta*kl and ll nearly cancel (here the
# loss is 1/25 of each term: rounding them to bf16 gave 0.031 for 0.041).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("num_samples", [None, 2])  # the one-pass kernel, the K-sample glue
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("backend", ["fused", "reference"])  # the reference too
def test_half_loss_is_rounded_once(device, dtype, num_samples, reduction, backend):
    x = torch.full((2, 8), 0.3, dtype=dtype, device=device)
    recon = x if num_samples is None else x.expand(num_samples, 2, 8)
    obs_logvar = torch.tensor(-3.0, dtype=dtype, device=device)
    # ll = 4*(3 - log(2pi)) = 4.65 per row (recon = x); kl = 2*mu^2 per row is 4% larger.
    mu_value = (2 * (3 - math.log(2 * math.pi)) * 1.04) ** 0.5
    mu = torch.full((2, 4), mu_value, dtype=dtype, device=device)
    logvar = torch.zeros(2, 4, dtype=dtype, device=device)
    with vae_fast.backend(backend):
        loss, _, _ = vae_fast.elbo(
            recon,
            x,
            mu,
            logvar,
            likelihood="gaussian",
            obs_logvar=obs_logvar,
            reduction=reduction,
            num_samples=num_samples,
        )
    ll = -4 * (math.log(2 * math.pi) + obs_logvar.double())
    per_row = 2 * mu.double()[0, 0] ** 2 - ll
    want = (per_row.expand(2) if reduction == "none" else 2 * per_row).to(dtype)
    assert torch.equal(loss, want), (loss, want)


def test_autocast_mixed_dtypes_run_in_float32():
    # Under autocast a decoder emits bfloat16 while the data stays float32; like torch's
    # own losses, elbo then runs in float32 instead of rejecting the mix of dtypes.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 10, generator=gen).round()
    recon = torch.randn(6, 10, generator=gen).bfloat16().requires_grad_()
    mu, logvar = (torch.randn(6, 3, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ll, kl = vae_fast.elbo(recon, x, mu, logvar)
    assert loss.dtype == ll.dtype == kl.dtype == torch.float32
    expected = vae_fast.reference.elbo(recon.float(), x, mu.float(), logvar.float())
    for got, want in zip((loss, ll, kl), expected):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5)
    loss.backward()
    assert recon.grad.dtype == torch.bfloat16 and recon.grad.shape == recon.shape
