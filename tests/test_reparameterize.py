"""vae_fast.reparameterize: z = mu + exp(logvar/2) * eps with eps from torch's generator.

eps is a Philox stream keyed by the generator (on CPU by one 64-bit draw from it, on
CUDA by its seed and offset), in the accumulation dtype (float32 for half inputs). It
depends on the generator's state, the shape and the dtype only, so re-seeding and
calling the op on any inputs of that shape recovers it: the tests use that to check
values and gradients element by element. On CPU the stream itself is checked
against a NumPy Philox4x32-10 and Box-Muller written from the paper.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    DEVICES,
    EXACT_DTYPES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    HAS_CUDA,
    check_against_truth,
    leaf,
    make,
)

import vae_fast

op = vae_fast.reparameterize
SEED = 1234


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def out_shape(shape, num_samples):
    return tuple(shape) if num_samples is None else (num_samples, *shape)


def draw_eps(shape, dtype, device, num_samples=None, seed=SEED, generator=None):
    """The eps a call on `dtype` inputs of `shape` made right after
    ``torch.manual_seed(seed)`` (or with `generator`) used: the op returns it."""
    if generator is None:
        torch.manual_seed(seed)
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    _, eps = torch.ops.vae_fast.reparameterize(zeros, zeros, num_samples, generator=generator)
    assert eps.dtype == opmath(dtype)
    return eps


def seeded_op(mu, logvar, num_samples=None):
    torch.manual_seed(SEED)
    return op(mu, logvar, num_samples=num_samples)


def seeded_truth(dtype):
    """mu + exp(logvar/2) * eps with the eps `seeded_op` draws for `dtype` inputs, computed
    in the dtype of the (fp64 truth or eager) inputs it is given."""

    def truth(mu, logvar, num_samples=None):
        eps = draw_eps(mu.shape, dtype, mu.device, num_samples)
        return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)

    return truth


def assert_z(z, mu, logvar, eps):
    """z is mu + exp(logvar/2) * eps up to a few roundings in z's dtype."""
    want = mu.detach().double() + torch.exp(0.5 * logvar.detach().double()) * eps.double()
    tol = 4 * torch.finfo(z.dtype).eps
    torch.testing.assert_close(z.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def inputs(shape, dtype, device, gen, layouts=("contiguous", "contiguous"), grad=(True, True)):
    mu = make(shape, dtype, device, layouts[0], kind="normal", gen=gen)
    logvar = make(shape, dtype, device, layouts[1], low=-3.0, high=2.0, gen=gen)
    return {"mu": leaf(mu, grad[0]), "logvar": leaf(logvar, grad[1])}


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 5, 17), (64, 100)])
@pytest.mark.parametrize("num_samples", [None, 1, 3])
def test_matches_formula(device, dtype, shape, num_samples, gen):
    # Value and both gradients (summed over the K samples) against the fp64 formula.
    ins = inputs(shape, dtype, device, gen)
    z = check_against_truth(
        seeded_op, seeded_truth(dtype), ins, dtype, gen=gen, kwargs={"num_samples": num_samples}
    )
    assert z.shape == out_shape(shape, num_samples)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize(
    "layouts",
    [
        ("transposed", "transposed"),
        ("strided", "contiguous"),
        ("contiguous", "expanded"),  # one logvar row for the whole batch (stride 0)
        ("expanded", "strided"),
    ],
)
def test_layouts(device, dtype, layouts, gen):
    # eps follows the logical (row-major) order of mu, whatever its memory layout: the
    # same values under the same seed give the same z.
    ins = inputs((7, 13), dtype, device, gen, layouts=layouts)
    check_against_truth(seeded_op, seeded_truth(dtype), ins, dtype, gen=gen)
    contiguous = seeded_op(ins["mu"].detach().contiguous(), ins["logvar"].detach().contiguous())
    assert torch.equal(seeded_op(ins["mu"].detach(), ins["logvar"].detach()), contiguous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("grad", [(True, False), (False, True)], ids=["mu", "logvar"])
def test_grad_of_one_input(device, dtype, grad, gen):
    ins = inputs((5, 11), dtype, device, gen, grad=grad)
    check_against_truth(
        seeded_op, seeded_truth(dtype), ins, dtype, gen=gen, kwargs={"num_samples": 2}
    )
    seeded_op(**ins).sum().backward()
    for name, g in zip(("mu", "logvar"), grad):
        assert (ins[name].grad is not None) == g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tiny_sigma_gradient(device, dtype):
    # sigma = exp(-30) ~ 1e-13 is far below the spacing of floats near mu = 1e4, so
    # z == mu exactly and (z - mu) / sigma recovers eps as 0: backward must use the eps
    # it drew. (float16 is left out: exp(-30) underflows there and the gradient is 0.)
    shape = (4, 33)
    mu = torch.full(shape, 1e4, dtype=dtype, device=device, requires_grad=True)
    logvar = torch.full(shape, -60.0, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.linspace(-2.0, 3.0, math.prod(shape), dtype=dtype, device=device)
    grad_out = grad_out.reshape(shape)
    torch.manual_seed(SEED)
    z = op(mu, logvar)
    assert torch.equal(z.detach(), mu.detach()), "the test needs z to round to mu"
    g_mu, g_logvar = torch.autograd.grad(z, [mu, logvar], grad_out)
    eps = draw_eps(shape, dtype, device).double()
    want = 0.5 * math.exp(-30.0) * eps * grad_out.double()
    assert torch.equal(g_mu, grad_out)
    assert (g_logvar != 0).all()
    ulps = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(g_logvar.double(), want.to(dtype).double(), rtol=ulps, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("logvar_value", [80.0, -80.0])
def test_extreme_logvar(device, dtype, logvar_value, gen):
    # sigma = exp(+-40): finite in float32; exp(logvar/2) must not be formed as sqrt(exp(logvar)).
    mu = make((3, 17), dtype, device, kind="normal", gen=gen)
    logvar = torch.full((3, 17), logvar_value, dtype=dtype, device=device)
    logvar = logvar + make((3, 17), dtype, device, low=-0.5, high=0.5, gen=gen)
    ins = {"mu": leaf(mu), "logvar": leaf(logvar)}
    z = check_against_truth(seeded_op, seeded_truth(dtype), ins, dtype, gen=gen)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_empty(device, dtype, num_samples, gen):
    ins = inputs((0, 4), dtype, device, gen)
    z = op(**ins, num_samples=num_samples)
    assert z.shape == out_shape((0, 4), num_samples) and z.dtype == dtype
    g_mu, g_lv = torch.autograd.grad(z, [ins["mu"], ins["logvar"]], torch.ones_like(z))
    assert g_mu.shape == (0, 4) and g_lv.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device, gen):
    ins = inputs((4, 9), torch.float64, device, gen)
    with torch.no_grad():
        z = seeded_op(**ins)
    assert z.grad_fn is None and not z.requires_grad
    assert_z(z, ins["mu"], ins["logvar"], draw_eps((4, 9), torch.float64, device))


# --------------------------------------------------------------------------- randomness


def _moments(e: torch.Tensor) -> tuple[float, float, float, float]:
    e = e.double().flatten()
    m = e.mean()
    c = e - m
    var = c.square().mean()
    return float(m), float(var), float(c.pow(3).mean() / var**1.5), float(c.pow(4).mean() / var**2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("num_samples", [None, 4])
def test_eps_statistics(device, dtype, num_samples, gen):
    # ~1e6 draws, standardized back to eps with a mu and sigma of order one (so that
    # (z - mu) / sigma is accurate here). Each moment must be within 5 standard errors
    # of N(0, 1)'s: mean 0 (se 1/sqrt(n)), variance 1 (sqrt(2/n)), skewness 0
    # (sqrt(6/n)), kurtosis 3 (sqrt(24/n)); and the CDF at a few points (sqrt(p(1-p)/n)).
    shape = (1000, 1000) if num_samples is None else (250, 1000)
    mu = make(shape, dtype, device, kind="normal", gen=gen)
    logvar = make(shape, dtype, device, low=-1.0, high=1.0, gen=gen)
    torch.manual_seed(7)
    z = op(mu, logvar, num_samples=num_samples)
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    n = eps.numel()
    assert n == 1_000_000
    mean, var, skew, kurt = _moments(eps)
    se = 1 / math.sqrt(n)
    assert abs(mean) < 5 * se, mean
    assert abs(var - 1) < 5 * math.sqrt(2) * se, var
    assert abs(skew) < 5 * math.sqrt(6) * se, skew
    assert abs(kurt - 3) < 5 * math.sqrt(24) * se, kurt
    for q in (-2.0, -1.0, 0.0, 1.0, 2.0):
        p = 0.5 * math.erfc(-q / math.sqrt(2))
        frac = float((eps < q).double().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (q, frac, p)


@pytest.mark.parametrize("device", DEVICES)
def test_samples_independent(device, gen):
    # num_samples=K draws K independent eps: no two samples are equal or correlated,
    # and the K samples of one element are not a shifted copy of each other.
    K, shape = 4, (200, 500)
    mu, logvar = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    z = op(mu, logvar, num_samples=K).double().reshape(K, -1)
    n = z.shape[1]
    corr = torch.corrcoef(z)
    off = corr[~torch.eye(K, dtype=torch.bool, device=corr.device)]
    assert off.abs().max() < 5 / math.sqrt(n), corr
    # across elements too: neighbouring elements of one sample are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([z[0, :-1], z[0, 1:]]))[0, 1])) < 5 / math.sqrt(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_samples", [None, 2])
def test_manual_seed_reproduces(device, dtype, num_samples, gen):
    ins = inputs((6, 35), dtype, device, gen, grad=(False, False))
    torch.manual_seed(SEED)
    a = op(**ins, num_samples=num_samples)
    torch.manual_seed(SEED)
    b = op(**ins, num_samples=num_samples)
    assert torch.equal(a, b)
    c = op(**ins, num_samples=num_samples)  # the next call draws new eps
    assert not torch.equal(a, c)
    assert_z(a, ins["mu"], ins["logvar"], draw_eps((6, 35), dtype, device, num_samples))


def test_cpu_call_takes_one_64_bit_draw():
    # The CPU op keys its stream with one random64() of the generator, whatever the
    # size: the generator then continues exactly as after any other such draw.
    torch.manual_seed(SEED)
    op(torch.zeros(300, 7), torch.zeros(300, 7), num_samples=3)
    after_op = torch.get_rng_state()
    torch.manual_seed(SEED)
    _philox_key(torch.default_generator)
    assert torch.equal(torch.get_rng_state(), after_op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_generator_reproduces(device, dtype, gen):
    ins = inputs((6, 35), dtype, device, gen, grad=(False, False))
    rng_state = torch.cuda.get_rng_state if device == "cuda" else torch.get_rng_state
    default_state = rng_state()
    g = torch.Generator(device=device).manual_seed(99)
    a = op(**ins, generator=g)
    b = op(**ins, generator=g)  # the generator advances
    assert not torch.equal(a, b)
    g2 = torch.Generator(device=device).manual_seed(99)
    assert torch.equal(op(**ins, generator=g2), a)
    assert torch.equal(op(**ins, generator=g2), b)
    # the default generator is untouched by a call with its own generator
    assert torch.equal(rng_state(), default_state)
    eps = draw_eps((6, 35), dtype, device, generator=torch.Generator(device=device).manual_seed(99))
    assert_z(a, ins["mu"], ins["logvar"], eps)


@pytest.mark.parametrize("device", DEVICES)
def test_generator_state_restores(device, gen):
    # Saving and restoring a generator's state replays a draw (checkpoint-style recompute).
    ins = inputs((5, 9), torch.float32, device, gen, grad=(False, False))
    g = torch.Generator(device=device).manual_seed(5)
    state = g.get_state()
    a = op(**ins, num_samples=3, generator=g)
    g.set_state(state)
    assert torch.equal(op(**ins, num_samples=3, generator=g), a)


# --------------------------------------------------------------------------- the CPU stream

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def _philox4x32(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) of uint64 arrays of 32-bit words."""
    c = [np.asarray(w, dtype=np.uint64) for w in counter]
    k0, k1 = (np.uint64(w) for w in key)
    for _ in range(10):
        p0, p1 = np.uint64(_PHILOX_M[0]) * c[0], np.uint64(_PHILOX_M[1]) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _MASK32,
        ]
        k0, k1 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32, (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
    return c


def _philox_key(generator: torch.Generator) -> int:
    # The CPU generator's next random64(): randint over the full int64 range takes
    # exactly one and returns it shifted by -2**63.
    return (int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator)) + 2**63) % 2**64


def _philox_normals(key: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n normals of the CPU stream (csrc/cpu/normal_kernel.cpp), in float64:
    block b of 8 counters 8b + l fills out[per_block*b + 8m + l]; Box-Muller on 24-bit
    (float) or 53-bit (double) uniforms."""
    per_block = 32 if dtype == torch.float32 else 16
    blocks = -(-n // per_block)
    counter = np.arange(8 * blocks, dtype=np.uint64)
    zeros = np.zeros_like(counter)
    w = _philox4x32(
        [counter & _MASK32, counter >> np.uint64(32), zeros, zeros], (key & 0xFFFFFFFF, key >> 32)
    )
    if dtype == torch.float32:
        bits = [(wi >> np.uint64(8)).astype(np.float64) for wi in w]
        pairs, scale = [(bits[0], bits[1]), (bits[2], bits[3])], 2.0**-24
    else:
        joined = [
            ((w[0] << np.uint64(32)) | w[1]) >> np.uint64(11),
            ((w[2] << np.uint64(32)) | w[3]) >> np.uint64(11),
        ]
        pairs, scale = [tuple(j.astype(np.float64) for j in joined)], 2.0**-53
    normals = []
    for u_bits, angle_bits in pairs:
        radius = np.sqrt(-2.0 * np.log((u_bits + 1.0) * scale))
        angle = angle_bits * scale * 2.0 * math.pi
        normals += [radius * np.cos(angle), radius * np.sin(angle)]
    out = np.stack([m.reshape(blocks, 8) for m in normals], axis=1)  # (block, m, lane)
    return torch.from_numpy(out.reshape(-1)[:n].copy())


def test_philox_reference_known_answers():
    # Random123's known-answer vectors for philox4x32-10, for the reference above.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        assert tuple(int(w) for w in _philox4x32(counter, key)) == want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (5, 7), (33,), (3, 1000), (70001,)])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_cpu_stream_is_philox_box_muller(dtype, shape, num_samples):
    # eps, over every tail length of a block and across parallel tasks, is the
    # reference stream of the key the generator gives (float: up to the rounding of
    # float32 log/sincos; double: to the last bits).
    eps = draw_eps(shape, dtype, "cpu", num_samples, generator=torch.Generator().manual_seed(3))
    want = _philox_normals(_philox_key(torch.Generator().manual_seed(3)), eps.numel(), eps.dtype)
    tol = 1e-12 if eps.dtype == torch.float64 else 4e-6
    torch.testing.assert_close(eps.double().flatten(), want, rtol=tol, atol=tol)


def test_cpu_draw_is_the_same_for_any_thread_count():
    threads = torch.get_num_threads()
    try:
        draws = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws.append(draw_eps((400, 1001), torch.float32, "cpu", num_samples=2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(d, draws[0]) for d in draws[1:])


# --------------------------------------------------------------------------- bad input


# (A 0-d tensor, even of True, passes operator.index: refused too.)
@pytest.mark.parametrize(
    "num_samples", [0, -1, True, np.bool_(True), 1.5, "2", torch.tensor(True), torch.tensor(2)]
)
def test_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match=r"`num_samples` must be a positive int or None"):
        op(torch.zeros(3, 4), torch.zeros(3, 4), num_samples=num_samples)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"`logvar` has shape \(4,\) but `mu` has shape \(3, 4\)"):
        op(torch.zeros(3, 4), torch.zeros(4))


def test_integer_dtype():
    with pytest.raises(TypeError, match=r"`mu` has dtype torch.int64; expected a floating"):
        op(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4))


def test_mixed_dtypes():
    with pytest.raises(
        TypeError, match=r"`logvar` has dtype torch.float16 but `mu` has torch.float32"
    ):
        op(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float16))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"`logvar` is on cuda:0 but `mu` is on cpu"):
        op(torch.zeros(3, 4), torch.zeros(3, 4, device="cuda"))


# --------------------------------------------------------------------------- the reference backend


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_draws_with_randn(device, gen):
    # The reference never calls the kernels it checks: without eps it draws with
    # torch.randn (here with a non-zero mu and logvar, so z's formula is checked too).
    ins = inputs((6, 35), torch.float32, device, gen, grad=(False, False))
    with vae_fast.backend("reference"):
        z = op(**ins, num_samples=2, generator=torch.Generator(device=device).manual_seed(4))
    eps = torch.randn(
        2, 6, 35, device=device, generator=torch.Generator(device=device).manual_seed(4)
    )
    want = ins["mu"] + torch.exp(0.5 * ins["logvar"]) * eps
    torch.testing.assert_close(z, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_for_a_given_eps(device, gen):
    # The way to compare the two backends: the same eps, given.
    ins = inputs((6, 35), torch.float32, device, gen, grad=(False, False))
    eps = torch.randn(2, 6, 35, generator=gen).to(device)
    fused = op(**ins, eps=eps, num_samples=2)
    with vae_fast.backend("reference"):
        ref = op(**ins, eps=eps, num_samples=2)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
