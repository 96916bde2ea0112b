"""The CUDA kernels path by path, against the CPU kernels on the same inputs.

GPU only: the whole module is skipped without a GPU and a CUDA build. The op suites
(tests/test_*.py, parametrized over devices) check the maths on small shapes; the
cases here reach each path of the CUDA row driver (csrc/cuda/rows.cuh, geometry in
csrc/cuda/row_plan.h) at the sizes that select it:

- a team of 1..32 lanes or a whole block per row;
- rows split over several blocks when there are too few to fill the GPU (their
  partial sums finished by the launch's last block);
- per-column sums (scalar / per-feature log-variance gradients) over one wave, in
  vectors when every row starts aligned, else element by element;
- 16-byte vectors with each row's unaligned head and tail peeled off (odd column
  counts, or inputs that all start off alignment), and element-by-element access
  where pointers are misaligned differently;
- the fused elbo's loss reduced in the same launch, over many blocks, with beta on
  the host or on the device;
- the multi-sample elbo's x, shared by the K samples' rows.

The index mapping itself is checked on the host (tests/test_build.py).
"""

from __future__ import annotations

import pytest
import torch


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from vae_fast import _C
    except ImportError:
        return False
    return bool(_C.with_cuda)


pytestmark = pytest.mark.skipif(
    not _cuda_ready(), reason="needs a GPU and a CUDA build of vae_fast"
)

OPS = torch.ops.vae_fast
ELBO_NAMES = ("loss", "ll", "kl", "grad_recon", "grad_obs", "grad_mu", "grad_logvar")

# name: (likelihood, x shape, obs_logvar kind, mu shape, layout); why each is there in the name.
# layout: "aligned" (fresh tensors), "offset" (x and recon one element off 16-byte
# alignment, the gradient written over recon, or none for "none": every pointer
# equally off, so vectors after a peeled head), "mixed" (x off, recon and the gradient
# aligned: element by element).
GRID_CASES = {
    "split_rows_block_team": ("bernoulli", (256, 49152), None, (256, 256), "aligned"),
    "one_row_many_splits": ("bernoulli", (1, 3_000_000), None, (1, 32), "aligned"),
    "warp_team_many_rows": ("bernoulli", (8192, 784), None, (8192, 32), "aligned"),
    "one_lane_rows_many_blocks_loss": (
        "bernoulli",
        (2_000_000, 1),
        None,
        (2_000_000, 1),
        "aligned",
    ),
    "sub_warp_team": ("gaussian", (4096, 24), "element", (4096, 8), "aligned"),
    "odd_cols_peeled_edges": ("bernoulli", (33, 13), None, (33, 5), "aligned"),
    "odd_cols_warp_team_peeled": ("bernoulli", (512, 1001), None, (512, 33), "aligned"),
    "offset_pointers_peeled": ("bernoulli", (64, 784), None, (64, 32), "offset"),
    "offset_pointers_gaussian": ("gaussian", (64, 785), "feature", (64, 32), "offset"),
    "mixed_alignment_scalar": ("bernoulli", (64, 784), None, (64, 32), "mixed"),
    "per_feature_obs_warp_team": ("gaussian", (4096, 784), "feature", (4096, 32), "aligned"),
    "per_feature_obs_block_team": ("gaussian", (64, 12288), "feature", (64, 16), "aligned"),
    "per_feature_obs_odd_cols_scalar": ("gaussian", (512, 785), "feature", (512, 32), "aligned"),
    "scalar_obs": ("gaussian", (512, 784), "scalar", (512, 32), "aligned"),
    "partial_broadcast_obs": ("gaussian", (96, 4, 196), "partial", (96, 32), "aligned"),
    "empty_events": ("gaussian", (5, 0), "feature", (5, 3), "aligned"),
    "empty_latent": ("bernoulli", (8, 10), None, (8, 0), "aligned"),
}


def _offset(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose storage starts one element off 16-byte alignment."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def _grid_inputs(likelihood, x_shape, obs_kind, z_shape, dtype, gen):
    x = torch.rand(x_shape, generator=gen, dtype=torch.float64)
    if likelihood == "bernoulli":
        x = (x < 0.5).double()
    recon = torch.randn(x_shape, generator=gen, dtype=torch.float64) * 2
    mu = torch.randn(z_shape, generator=gen, dtype=torch.float64)
    logvar = torch.randn(z_shape, generator=gen, dtype=torch.float64) * 0.5
    obs_shape = {
        None: None,
        "scalar": (),
        "feature": x_shape[1:],
        "element": x_shape,
        "partial": (x_shape[1], 1),
    }[obs_kind]
    obs = None
    if obs_shape is not None:
        obs = torch.randn(obs_shape, generator=gen, dtype=torch.float64) * 0.3
    return [t if t is None else t.to(dtype) for t in (x, recon, mu, logvar, obs)]


def _compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if not want.numel():
        return
    # Different summation orders: a few ulp of the largest value, plus rounding once.
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[
        dtype
    ]
    scale = float(want.double().abs().max())
    torch.testing.assert_close(
        got.cpu().double(), want.double(), rtol=rtol, atol=rtol * scale, msg=what
    )


def _beta(where: str) -> torch.Tensor:
    return torch.tensor(0.7, dtype=torch.float64, device="cuda" if where == "device" else "cpu")


@pytest.mark.parametrize("beta_on", ["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GRID_CASES))
def test_cuda_elbo_grid_paths_match_cpu(case: str, dtype: torch.dtype, beta_on: str) -> None:
    likelihood, x_shape, obs_kind, z_shape, layout = GRID_CASES[case]
    gen = torch.Generator().manual_seed(0)
    cpu = _grid_inputs(likelihood, x_shape, obs_kind, z_shape, dtype, gen)
    cuda = [t if t is None else t.cuda() for t in cpu]
    if layout in ("offset", "mixed"):
        cuda[0] = _offset(cuda[0])
    if layout == "offset":
        cuda[1] = _offset(cuda[1])
    for reduction in ("mean", "sum", "none"):
        if layout == "offset" and reduction == "none":
            # No gradient (it needs grad_output): x and recon are all the task reads.
            want = OPS.elbo(*cpu[:4], cpu[4], likelihood, _beta("host"), reduction, False)
            got = OPS.elbo(*cuda[:4], cuda[4], likelihood, _beta(beta_on), reduction, False)
            pairs = zip(ELBO_NAMES, got, want)
        elif layout == "offset":
            # The gradient over recon itself: every pointer of the task equally off.
            recon_cpu, recon_cuda = cpu[1].clone(), _offset(cuda[1])
            want = OPS._elbo_into_recon(
                cpu[0], recon_cpu, *cpu[2:4], cpu[4], likelihood, _beta("host"), reduction
            )
            got = OPS._elbo_into_recon(
                cuda[0], recon_cuda, *cuda[2:4], cuda[4], likelihood, _beta(beta_on), reduction
            )
            pairs = zip(("loss", "ll", "kl", "grad_obs", "grad_mu", "grad_logvar", "recon"),
                        (*got, recon_cuda), (*want, recon_cpu))  # fmt: skip
        else:
            want = OPS.elbo(*cpu[:4], cpu[4], likelihood, _beta("host"), reduction, True)
            got = OPS.elbo(*cuda[:4], cuda[4], likelihood, _beta(beta_on), reduction, True)
            pairs = zip(ELBO_NAMES, got, want)
        for name, g, w in pairs:
            _compare(g, w, dtype, f"{case} {reduction} {name}")


@pytest.mark.parametrize("likelihood, obs_kind", [("bernoulli", None), ("gaussian", "feature")])
@pytest.mark.parametrize(
    "x_shape",
    [
        (3, 5),  # B * D = 15: x's rows for samples k >= 1 start off the others' alignment
        (4, 5),  # B * D = 20: odd rows, yet every sample's x rows keep the alignment
        (64, 784),  # the common image size: vectors throughout
    ],
)
def test_cuda_multi_sample_elbo_reads_shared_x_aligned(x_shape, likelihood, obs_kind) -> None:
    """elbo(num_samples=K): K * B rows of recon read B rows of x (row r reads r % B)."""
    gen = torch.Generator().manual_seed(3)
    x, _, mu, logvar, obs = _grid_inputs(
        likelihood, x_shape, obs_kind, (x_shape[0], 8), torch.float32, gen
    )
    recon = torch.randn(3, *x_shape, generator=gen)
    cpu = (x, recon, mu, logvar, obs)
    cuda = [t if t is None else t.cuda() for t in cpu]
    want = OPS.elbo(*cpu[:4], cpu[4], likelihood, _beta("host"), "mean", True)
    got = OPS.elbo(*cuda[:4], cuda[4], likelihood, _beta("device"), "mean", True)
    torch.cuda.synchronize()  # a misaligned access would surface here
    for name, g, w in zip(ELBO_NAMES, got, want):
        _compare(g, w, torch.float32, f"{x_shape} {likelihood} {name}")


@pytest.mark.parametrize(
    "case", ["split_rows_block_team", "one_row_many_splits", "one_lane_rows_many_blocks_loss"]
)
def test_cuda_elbo_is_deterministic(case: str) -> None:
    """No float atomics: split rows and the multi-block loss give the same bits every run."""
    likelihood, x_shape, obs_kind, z_shape, _ = GRID_CASES[case]
    inputs = [
        t if t is None else t.cuda()
        for t in _grid_inputs(
            likelihood, x_shape, obs_kind, z_shape, torch.float32, torch.Generator().manual_seed(2)
        )
    ]
    first = OPS.elbo(*inputs[:4], inputs[4], likelihood, _beta("device"), "mean", True)
    for _ in range(3):
        again = OPS.elbo(*inputs[:4], inputs[4], likelihood, _beta("device"), "mean", True)
        for name, a, b in zip(ELBO_NAMES, first, again):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_single_op_backwards_match_cpu(dtype: torch.dtype) -> None:
    """Per-row weights, broadcast priors / logvar (per-column sums and sum_to_size)."""
    gen = torch.Generator().manual_seed(1)

    def draw(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    x, mean = draw(300, 3, 130), draw(300, 3, 130)
    logvar = draw(3, 130) * 0.3  # per-feature for event_dims=2
    grad = draw(300)
    mu, lv = draw(300, 64), draw(300, 64) * 0.3
    pm, plv = draw(64), draw() * 0.3  # per-feature and scalar priors
    gz = draw(300, 64)
    calls = [
        lambda d: OPS._bernoulli_log_prob_backward(
            d(grad), d(x.sigmoid()), d(mean), 2, [True, True]
        ),
        lambda d: OPS._gaussian_log_prob_backward(
            d(grad), d(x), d(mean), d(logvar), 2, [True, True, True]
        ),
        lambda d: OPS._gaussian_log_prob_backward(
            d(grad[:, None].expand(300, 3).contiguous()),
            d(x),
            d(mean),
            d(logvar[:, :1]),
            1,
            [False, False, True],
        ),  # logvar (3, 1): per-element with a sum back to (3, 1)
        lambda d: OPS._gaussian_kl_backward(
            d(grad), d(mu), d(lv), d(pm), d(plv), 1, [True, True, True, True]
        ),
        lambda d: OPS._gaussian_kl_backward(
            d(grad), d(mu), d(lv), d(pm.expand(300, 64)), None, 1, [False, False, True, True]
        ),
        lambda d: (OPS.gaussian_kl(d(mu), d(lv), d(pm), d(plv), 1),),
        lambda d: (OPS.gaussian_log_prob(d(x), d(mean), d(logvar), 2),),
        # Forward ops with every input one element off alignment: peeled heads.
        lambda d: (OPS.bernoulli_log_prob(d(x.sigmoid(), True), d(mean, True), 2),),
        lambda d: (OPS.gaussian_log_prob(d(x, True), d(mean, True), d(logvar), 1),),
        lambda d: OPS._reparameterize_backward(
            d(gz),
            d(lv),
            d(draw(300, 64).to(torch.float64 if dtype == torch.float64 else torch.float32)),
            [True, True],
        ),
    ]
    for i, call in enumerate(calls):
        # The same random draws on both devices: re-seed before each call.
        gen.manual_seed(100 + i)
        want = call(lambda t, offset=False: t)
        gen.manual_seed(100 + i)
        got = call(
            lambda t, offset=False: t if t is None else (_offset(t.cuda()) if offset else t.cuda())
        )
        for j, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, dtype, f"call {i} output {j}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_bernoulli_gradient_at_saturation(dtype: torch.dtype) -> None:
    """x - sigmoid(l) as (x - 1) + e/(1+e) for l >= 0: exactly 0 at x = 1, l = +inf, and
    the tiny e/(1+e) kept at large finite l (1 - 1/(1+e) would round it away)."""
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    logits = torch.tensor([[float("inf"), 30.0, float("-inf"), -30.0, 0.0]], dtype=dtype)
    grad = torch.ones(1, dtype=dtype)
    _, want = OPS._bernoulli_log_prob_backward(grad, x, logits, 1, [False, True])
    _, got = OPS._bernoulli_log_prob_backward(
        grad.cuda(), x.cuda(), logits.cuda(), 1, [False, True]
    )
    assert got[0, 0].item() == 0.0 and got[0, 2].item() == 0.0
    assert 0 < got[0, 1].item() < 1e-12 and -1e-12 < got[0, 3].item() < 0
    _compare(got, want, dtype, "saturated gradients")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.cpu().double() - want) / want).abs().max())


def test_cuda_float32_accuracy_against_float64() -> None:
    """The float paths' short forms (log1p polynomial, one-piece expm1 - x, fast exp and
    division) and the row sums over long rows and many blocks, against float64: as on
    the CPU (tests/test_accuracy.py), 2e-6 relative on rows of 3e6 elements and 1e-6
    per row for a near-perfect decoder (row losses ~0.005 nats)."""
    import vae_fast

    g = torch.Generator().manual_seed(0)
    n = 3_000_000
    x, m, lv = (torch.randn(1, n, generator=g) for _ in range(3))
    x01 = torch.rand(1, n, generator=g).round()
    cases = {
        "gaussian_log_prob": (vae_fast.gaussian_log_prob, (x, m, lv[0, 0])),
        "bernoulli_log_prob": (vae_fast.bernoulli_log_prob, (x01, 3 * m)),
        "gaussian_kl": (vae_fast.gaussian_kl, (m, lv)),
    }
    for name, (fn, args) in cases.items():
        got = fn(*(a.cuda() for a in args))
        with vae_fast.backend("reference"):
            want = fn(*(a.double() for a in args))
        assert _rel(got, want) < 2e-6, name

    x = torch.rand(64, 784, generator=g).round()
    logits = (2 * x - 1) * (18 + 4 * torch.rand(64, 784, generator=g))
    mu = torch.zeros(64, 2)
    _, got, _ = vae_fast.elbo(logits.cuda(), x.cuda(), mu.cuda(), mu.cuda(), reduction="none")
    with vae_fast.backend("reference"):
        want = vae_fast.bernoulli_log_prob(x.double(), logits.double())
    assert _rel(got, want) < 1e-6


def test_cuda_reparameterize_seeding_and_graph_capture() -> None:
    """torch.manual_seed reproduces a draw; a captured graph draws fresh eps per replay
    and reproduces the same sequence after re-seeding."""
    op = OPS.reparameterize
    # (4096, 33): 33 columns, but mu's 135168 elements are a multiple of 4, so the
    # flat 4-element vector path; (4095, 33): 135135 elements, element by element.
    for shape in ((4096, 33), (4095, 33)):
        mu = torch.randn(shape, device="cuda")
        lv = torch.randn(shape, device="cuda") * 0.3
        torch.manual_seed(0)
        z1, e1 = op(mu, lv, 3)
        torch.manual_seed(0)
        z2, e2 = op(mu, lv, 3)
        assert torch.equal(e1, e2) and torch.equal(z1, z2)
        torch.testing.assert_close(z1, mu + torch.exp(0.5 * lv) * e1)
        assert abs(float(e1.mean())) < 0.01 and abs(float(e1.std()) - 1) < 0.01

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(mu, lv)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        _, eps = op(mu, lv)
    torch.cuda.manual_seed(5)
    graph.replay()
    a = eps.clone()
    graph.replay()
    b = eps.clone()
    torch.cuda.manual_seed(5)
    graph.replay()
    c = eps.clone()
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_cuda_empty_reparameterize_advances_the_generator() -> None:
    """As on the CPU, every call draws, an empty one too."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    before = gen.get_state()
    z, eps = OPS.reparameterize(
        torch.zeros(0, 4, device="cuda"), torch.zeros(0, 4, device="cuda"), generator=gen
    )
    assert z.shape == eps.shape == (0, 4)
    assert not torch.equal(gen.get_state(), before)


def _training_setup(likelihood: str):
    import vae_fast
    from vae_fast.nn import VAE, ELBOLoss

    torch.manual_seed(0)
    model = VAE(784, 32, hidden=(256,), likelihood=likelihood).cuda()
    loss_fn = ELBOLoss(
        likelihood, obs_logvar="scalar" if likelihood == "gaussian" else "fixed"
    ).cuda()
    params = [*model.parameters(), *loss_fn.parameters()]
    x = torch.rand(512, 784, device="cuda")
    if likelihood == "bernoulli":
        x = (x < 0.5).float()
    return vae_fast, model, loss_fn, params, x


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_cuda_training_step_has_no_host_sync(likelihood: str) -> None:
    """Forward, backward and an optimizer step without one host sync (validation, which
    reads a flag back, off)."""
    vae_fast, model, loss_fn, params, x = _training_setup(likelihood)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    vae_fast.set_default_validate_args(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the second step with momentum buffers
            out = model(x)
            loss = loss_fn(out.recon, x, out.mu, out.logvar)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        vae_fast.set_default_validate_args(True)
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_cuda_training_step_in_a_cuda_graph(likelihood: str) -> None:
    """A whole training step captured once and replayed gives the eager steps' losses
    (fresh eps each replay, drawn from the same generator sequence)."""
    vae_fast, model, loss_fn, params, x = _training_setup(likelihood)
    modules = (model, loss_fn)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]

    def restore():  # in place: the graph keeps the parameters' storage
        for m, state in zip(modules, states):
            m.load_state_dict(state)

    static_x = x.clone()
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        out = model(static_x)
        loss = loss_fn(out.recon, static_x, out.mu, out.logvar)[0]
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss

    vae_fast.set_default_validate_args(False)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: allocations, lazy inits, .grad tensors
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()

        restore()
        torch.cuda.manual_seed(11)
        replayed = []
        for _ in range(3):
            graph.replay()
            replayed.append(static_loss.item())
        restore()
        torch.cuda.manual_seed(11)
        eager = [step().item() for _ in range(3)]
    finally:
        vae_fast.set_default_validate_args(True)
    assert torch.isfinite(torch.tensor(replayed)).all()
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [float("inf"), float("nan")])
def test_cuda_empty_latent_meets_a_non_finite_beta(beta: float) -> None:
    # No KL pass runs for a (B, 0) latent: the reduced loss still takes beta * 0, nan
    # here, as the CPU and the per-row loss give.
    x = torch.ones(3, 5, device="cuda")
    recon, z = torch.zeros(3, 5, device="cuda"), torch.zeros(3, 0, device="cuda")
    beta_t = torch.tensor(beta, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        loss = OPS.elbo(x, recon, z, z, None, "bernoulli", beta_t, reduction, False)[0]
        assert loss.isnan(), reduction
