"""Shared parametrizations, input makers and tolerance rules for the op tests.

Accuracy rule (what "matches" means everywhere in tests/):
- float64 and float32 results are compared with an fp64 ground truth computed by
  ``torch.distributions`` on fp64 copies of the (already rounded) inputs, with
  relative tolerance 1e-10 and 2e-5. Sums and gradients have elements near zero
  whose own relative error means nothing, so the absolute floor is the same
  relative tolerance times the largest magnitude in the tensor.
- bfloat16 and float16 follow flash-attention's rule: the error of the op against
  the fp64 truth is at most twice the error of eager torch (the same
  ``torch.distributions`` code run in that dtype) plus one ulp of the largest value.

``pytest --vae-backend=reference`` runs the whole suite against ``vae_fast.reference``
(tests of the compiled operators themselves are marked ``fused_only`` and skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cuda_compile
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import vae_fast

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")),
]
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
EXACT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = (torch.bfloat16, torch.float16)
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# Eager-error multiple of the bf16/fp16 rule.
HALF_FACTOR = 2.0

# Shapes every op runs on; the comment says why each is there.
SHAPES = [
    (1, 1),  # the smallest batch: one row of one element (no vector body at all)
    (7, 13),  # odd sizes: every row is a vector remainder, odd number of rows
    (3, 5, 17),  # a 3-d input: event_dims=None sums two dims; 17 is not a vector multiple
    (257, 1000),  # several vectors and parallel chunks per row, an odd row count
]
# event_dims to test; "all" means x.dim() (a 0-d result).
EVENT_DIMS = [None, 0, 1, "all"]
# Memory layouts of an input with the same values (see `make`).
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--vae-backend",
        choices=("fused", "reference"),
        default="fused",
        help="run the op tests against vae_fast's fused kernels (default) or its reference",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fused_only: calls torch.ops.vae_fast.* directly (skipped with the reference)"
    )


# The nvcc compile checks (tests/cuda_compile.py) take about a minute of CPU: their
# compiles start when collection ends and run beside the other tests, which go first.
def _waits_on_nvcc(item: pytest.Item) -> bool:
    return getattr(item, "originalname", None) == "test_cuda_source_compiles"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_waits_on_nvcc)  # stable: the others keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    if cuda_compile.NVCC is not None and any(map(_waits_on_nvcc, session.items)):
        cuda_compile.start()


@pytest.fixture(autouse=True)
def vae_backend(request: pytest.FixtureRequest):
    """Every test runs inside ``vae_fast.backend(--vae-backend)``; yields the backend name."""
    name = request.config.getoption("--vae-backend")
    if name == "reference" and request.node.get_closest_marker("fused_only"):
        pytest.skip("tests the compiled operators, not the reference")
    with vae_fast.backend(name):
        yield name


# --------------------------------------------------------------------------- inputs


def resolve_event_dims(event_dims, ndim: int) -> int | None:
    return ndim if event_dims == "all" else event_dims


def event_sum(t: torch.Tensor, event_dims: int | None) -> torch.Tensor:
    """Sum the last `event_dims` dims (None: every dim but the first), like the ops."""
    k = max(t.dim() - 1, 0) if event_dims is None else event_dims
    return t.sum(dim=tuple(range(t.dim() - k, t.dim()))) if k else t


def make(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str,
    layout: str = "contiguous",
    *,
    low: float = -2.0,
    high: float = 2.0,
    kind: str = "uniform",
    gen: torch.Generator,
) -> torch.Tensor:
    """A tensor of `shape` with the given memory layout, values drawn in fp64 then rounded.

    - contiguous: a plain dense tensor.
    - transposed: the last two dims are swapped in memory (needs 2 dims).
    - strided: every other element of a buffer twice as long in the last dim (step 2).
    - expanded: one row broadcast over the first dim (stride 0), as a broadcast target.
    """
    shape = tuple(shape)

    def draw(s):
        if kind == "uniform":
            v = torch.rand(s, dtype=torch.float64, generator=gen) * (high - low) + low
        elif kind == "normal":
            v = torch.randn(s, dtype=torch.float64, generator=gen) * high
        elif kind == "binary":
            v = (torch.rand(s, dtype=torch.float64, generator=gen) < 0.5).double()
        else:
            raise ValueError(kind)
        return v.to(dtype)

    if layout == "contiguous" or len(shape) == 0:
        t = draw(shape)
    elif layout == "transposed":
        if len(shape) < 2:
            return make(shape, dtype, device, "strided", low=low, high=high, kind=kind, gen=gen)
        t = draw((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "strided":
        base = draw((*shape[:-1], 2 * shape[-1]))
        t = base[..., ::2]
    elif layout == "expanded":
        t = draw((1, *shape[1:])).expand(shape)
    else:
        raise ValueError(layout)
    t = t.to(device)
    if layout == "transposed" and len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:
        assert not t.is_contiguous()
    return t


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """`t` as a leaf that keeps its strides (detach does not copy)."""
    return t.detach().requires_grad_(requires_grad)


def fp64(t: torch.Tensor | None, requires_grad: bool | None = None) -> torch.Tensor | None:
    """An fp64 copy of `t` (the rounded values) for the ground truth."""
    if t is None:
        return None
    c = t.detach().to(torch.float64)
    if requires_grad if requires_grad is not None else t.requires_grad:
        c.requires_grad_(True)
    return c


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A copy of `t` in dtype that requires grad where `t` does (eager torch in that dtype)."""
    if t is None:
        return None
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------- ground truth


def _scale(logvar: torch.Tensor) -> torch.Tensor:
    return torch.exp(0.5 * logvar)


def truth_bernoulli(x, logits, event_dims=None):
    lp = Bernoulli(logits=logits, validate_args=False).log_prob(x)
    return event_sum(lp, event_dims)


def truth_gaussian(x, mean, logvar, event_dims=None):
    lp = Normal(mean, _scale(logvar), validate_args=False).log_prob(x)
    return event_sum(lp, event_dims)


def truth_kl(mu, logvar, prior_mu=None, prior_logvar=None, event_dims=None):
    pm = prior_mu if prior_mu is not None else torch.zeros((), dtype=mu.dtype, device=mu.device)
    ps = _scale(prior_logvar) if prior_logvar is not None else torch.ones_like(pm)
    kl = kl_divergence(Normal(mu, _scale(logvar), validate_args=False), Normal(pm, ps))
    return event_sum(kl.expand(mu.shape), event_dims)


def truth_elbo(
    x, recon, mu, logvar, likelihood="bernoulli", obs_logvar=None, beta=1.0, reduction="mean"
):
    if likelihood == "bernoulli":
        ll = truth_bernoulli(x, recon)
    else:
        obs = obs_logvar if obs_logvar is not None else torch.zeros((), dtype=x.dtype)
        ll = truth_gaussian(x, recon, obs.to(x.device))
    kl = truth_kl(mu, logvar)
    per = beta * kl - ll
    loss = {"mean": per.mean, "sum": per.sum, "none": lambda: per}[reduction]()
    return loss, ll, kl


# --------------------------------------------------------------------------- comparisons


def _max_abs(t: torch.Tensor) -> float:
    """The largest finite magnitude in `t` (0 if none): the scale of its absolute tolerance."""
    if not t.numel():
        return 0.0
    return float(t.detach().abs().nan_to_num(nan=0.0, posinf=0.0).max())


def assert_close_exact(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """float64/float32: elementwise rtol with an absolute floor of rtol * max|want|."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    atol = rtol * _max_abs(want)
    # A quick check first (torch.testing is slow on millions of elements); it only
    # runs to produce its detailed message when something is off.
    bad = (got - want).abs() > atol + rtol * want.abs()
    same_special = (got == want) | (got.isnan() & want.isnan())
    if (bad & ~same_special).any():
        torch.testing.assert_close(
            got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
        )
        raise AssertionError(f"{what}: not close (rtol={rtol}, atol={atol})")


def assert_close_half(got, want, eager, dtype, what: str = "") -> None:
    """bf16/fp16: |got - truth| <= HALF_FACTOR * |eager - truth| + one ulp of max|truth|."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.numel():
        return
    err = _max_abs(got.double() - want)
    eager_err = _max_abs(eager.double() - want)
    bound = HALF_FACTOR * eager_err + torch.finfo(dtype).eps * _max_abs(want)
    assert err <= bound, (
        f"{what}: {dtype} error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"
    )


def assert_close_dtype(got, want, dtype, *, eager=None, what: str = "") -> None:
    if dtype in HALF_DTYPES:
        assert eager is not None, "the half-precision rule needs eager torch's result"
        assert_close_half(got, want, eager, dtype, what)
    else:
        assert_close_exact(got, want, RTOL[dtype], what)


def check_against_truth(
    op: Callable[..., torch.Tensor],
    truth: Callable[..., torch.Tensor],
    inputs: Mapping[str, torch.Tensor | None],
    dtype: torch.dtype,
    *,
    gen: torch.Generator,
    kwargs: Mapping | None = None,
) -> torch.Tensor:
    """Run `op(**inputs)`, backward with a random grad_output, and compare the value and the
    gradients of every input that requires grad with `truth` (torch.distributions) in fp64.
    For half dtypes, `truth` run in that dtype is eager torch's error yardstick.
    Returns the op's output."""
    kwargs = dict(kwargs or {})
    out = op(**inputs, **kwargs)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    grads_of = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grad_out = None
    if grads_of:
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(dtype)
        grad_out = grad_out.to(out.device)
        got_grads = torch.autograd.grad(out, [inputs[k] for k in grads_of], grad_out)
    ref_inputs = {k: fp64(v) for k, v in inputs.items()}
    want = truth(**ref_inputs, **kwargs)
    want_grads = (
        torch.autograd.grad(want, [ref_inputs[k] for k in grads_of], grad_out.double())
        if grads_of
        else ()
    )
    eager = eager_grads = None
    if dtype in HALF_DTYPES:
        eager_inputs = {k: cast(v, dtype) for k, v in inputs.items()}
        eager = truth(**eager_inputs, **kwargs)
        if grads_of:
            eager_grads = torch.autograd.grad(eager, [eager_inputs[k] for k in grads_of], grad_out)
    assert_close_dtype(out, want, dtype, eager=eager, what="value")
    for i, name in enumerate(grads_of):
        shape, want_shape = tuple(got_grads[i].shape), tuple(inputs[name].shape)
        assert shape == want_shape, f"grad of {name}: shape {shape}, expected {want_shape}"
        assert got_grads[i].dtype == dtype, f"grad of {name}: dtype {got_grads[i].dtype}"
        assert_close_dtype(
            got_grads[i],
            want_grads[i],
            dtype,
            eager=None if eager_grads is None else eager_grads[i],
            what=f"grad of {name}",
        )
    return out


@pytest.fixture
def reference_draws_like_fused(monkeypatch):
    """The reference backend draws eps with torch.randn, never with the kernels it checks.
    Tests that compare whole models across backends (where eps cannot be passed in) make
    it take the fused op's draw here instead, so that both see the same eps."""
    from vae_fast import _random

    def fused_draw(mu, num_samples, generator):
        zeros = torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device)
        return torch.ops.vae_fast.reparameterize(zeros, zeros, num_samples, generator=generator)[1]

    monkeypatch.setattr(_random, "standard_normal", fused_draw)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded the same way in every test: inputs are reproducible."""
    return torch.Generator().manual_seed(20240607)
