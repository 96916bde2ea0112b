"""Every CUDA kernel path once, each output compared with the CPU kernels.

Run by tools/gpu_check.sh (`make gpu-check`) plainly and under compute-sanitizer
(memcheck, racecheck), so it keeps to small shapes that still reach each path of the
row driver (csrc/cuda/rows.cuh; tests/test_cuda.py has the large ones):

- bernoulli_log_prob forward / backward, gaussian_log_prob with a scalar, per-feature,
  per-element and partly broadcast logvar, forward / backward, gaussian_kl with no
  prior, scalar / per-feature / per-element / expanded priors, forward / backward;
- reparameterize with and without num_samples, vector and element paths, empty;
  its backward;
- elbo, both likelihoods, every reduction, beta on the host and on the device, with
  and without gradients; _elbo_into_recon; iwae;
- team shapes from one lane to a whole block per row, rows split over blocks
  (B = 1, large D), per-column sums, odd column counts (peeled heads and tails),
  inputs off 16-byte alignment (all alike: peeled; differently: element by element),
  empty batches and events.

    python tools/gpu_check_driver.py --device cuda [--small] [--dtypes float32,bfloat16]

--device cpu runs the same calls with the CPU on both sides: it checks this script,
not the kernels. --profile instead runs the benchmark-sized elbo calls once each (for
Nsight Compute). Exit status 3 when an output differs, 0 when all match.
"""

from __future__ import annotations

import argparse
import sys

import torch

import vae_fast  # noqa: F401  (registers the ops)

OPS = torch.ops.vae_fast
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class Checker:
    def __init__(self, device: str) -> None:
        self.device = device
        self.gen = torch.Generator().manual_seed(0)
        self.failures: list[str] = []
        self.checked = 0

    def rnd(self, shape, dtype, lo=-2.0, hi=2.0) -> torch.Tensor:
        u = torch.rand(shape, generator=self.gen, dtype=torch.float64)
        return (u * (hi - lo) + lo).to(dtype)

    def dev(self, t: torch.Tensor | None, offset: bool = False) -> torch.Tensor | None:
        """`t` on the device; `offset`: in storage one element off 16-byte alignment."""
        if t is None:
            return None
        if not offset:
            return t.to(self.device)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=self.device)
        out = flat[1:].view(t.shape)
        out.copy_(t)
        return out

    def compare(self, name: str, got, want, dtype: torch.dtype) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()  # a kernel fault surfaces here, named
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        for i, (g, w) in enumerate(zip(got, want)):
            self.checked += 1
            try:
                assert g.shape == w.shape, f"shape {tuple(g.shape)} vs {tuple(w.shape)}"
                assert g.dtype == w.dtype, f"dtype {g.dtype} vs {w.dtype}"
                if w.numel():
                    gd, wd = g.detach().cpu().double(), w.detach().cpu().double()
                    finite = wd[torch.isfinite(wd)]
                    scale = float(finite.abs().max()) if finite.numel() else 1.0
                    tol = TOL[dtype]
                    torch.testing.assert_close(
                        gd, wd, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True
                    )
            except AssertionError as e:
                first = str(e).strip().splitlines()[0]
                self.failures.append(f"{name} [output {i}] {dtype}: {first}")


# (likelihood, x shape, z shape, obs_logvar kind, layout): the path each reaches.
# layout: aligned; "offset": x and recon one element off alignment (gradients then go
# over recon, _elbo_into_recon, or none), "mixed": x off, the rest aligned.
ELBO = [
    ("bernoulli", (4, 8192), (4, 16), None, "aligned"),  # block team, rows split over blocks
    ("bernoulli", (1, 40000), (1, 8), None, "aligned"),  # B = 1: one row over many blocks
    ("bernoulli", (64, 784), (64, 32), None, "aligned"),  # warp team, many rows
    ("bernoulli", (300, 1), (300, 1), None, "aligned"),  # D = 1: one lane per row
    ("bernoulli", (33, 13), (33, 5), None, "aligned"),  # odd columns: peeled heads, tails
    ("bernoulli", (16, 784), (16, 32), None, "offset"),  # all off alike: peeled, vectors
    ("bernoulli", (16, 784), (16, 32), None, "mixed"),  # off differently: element by element
    ("gaussian", (64, 24), (64, 8), "element", "aligned"),  # sub-warp team, per-element obs
    ("gaussian", (64, 784), (64, 32), "feature", "aligned"),  # per-column sums, warp team
    ("gaussian", (8, 12288), (8, 16), "feature", "aligned"),  # per-column sums, block team
    ("gaussian", (16, 785), (16, 8), "feature", "aligned"),  # per-column sums, element mode
    ("gaussian", (2, 30000), (2, 16), "feature", "aligned"),  # per-column, many splits
    ("gaussian", (64, 784), (64, 32), "scalar", "aligned"),  # scalar obs
    ("gaussian", (24, 4, 196), (24, 32), "partial", "aligned"),  # (4, 1) obs: sum_to_size
    ("gaussian", (1000,), (1000, 3), "scalar", "aligned"),  # 1-d x
    ("gaussian", (16, 785), (16, 8), "feature", "offset"),  # feature obs read off alignment
    ("bernoulli", (0, 784), (0, 32), None, "aligned"),  # empty batch
    ("gaussian", (5, 0), (5, 3), "feature", "aligned"),  # empty events
    ("bernoulli", (6, 10), (6, 0), None, "aligned"),  # empty latent
]
SINGLE = [((6, 5, 17), 0), ((6, 5, 17), 1), ((6, 5, 17), 3), ((300, 3, 130), 2), ((4, 2048), 1)]
KL = [(300, 64), (7, 13), (1, 9000), (5000, 1)]
REPARAMETERIZE = [  # (shape, num_samples, offset)
    ((256, 32), None, False),  # flat 4-element vectors
    ((7, 13), None, False),  # 91 elements: element by element
    ((7, 13), 3, False),
    ((64, 33), 2, False),  # 2112 elements, a multiple of 4: vectors
    ((256, 32), 4, True),  # off alignment: element by element
    ((0, 4), None, False),  # empty: still advances the generator
]
IWAE = [("bernoulli", 3, (16, 784), (16, 8), "iwae"), ("gaussian", 2, (8, 33), (8, 4), "stl")]


def obs_shape(kind, x_shape):
    if kind is None:
        return None
    return {
        "scalar": (),
        "feature": x_shape[1:],
        "element": x_shape,
        "partial": (x_shape[1], 1) if len(x_shape) > 2 else None,
    }[kind]


def run_elbo(c: Checker, dtypes) -> None:
    for lik, xs, zs, obs_kind, layout in ELBO:
        for dt in dtypes:
            x = (c.rnd(xs, dt, 0, 1) > 0.5).to(dt) if lik == "bernoulli" else c.rnd(xs, dt)
            recon, mu, lv = c.rnd(xs, dt, -4, 4), c.rnd(zs, dt), c.rnd(zs, dt, -1, 1)
            shape = obs_shape(obs_kind, xs)
            obs = None if shape is None else c.rnd(shape, dt, -0.5, 0.5)
            cpu = [x, recon, mu, lv, obs]
            gpu = [
                c.dev(x, layout != "aligned"),
                c.dev(recon, layout == "offset"),
                *map(c.dev, (mu, lv, obs)),
            ]
            host_beta = torch.tensor(0.7, dtype=torch.float64)
            for beta_on in ("host", "device"):
                beta = host_beta if beta_on == "host" else host_beta.to(c.device)
                what = f"{lik} x{xs} obs={obs_kind} {layout} beta on {beta_on}"
                for red in ("mean", "sum", "none"):
                    # offset layout: a fresh gradient would be aligned; no gradient here.
                    grad = layout != "offset"
                    want = OPS.elbo(*cpu[:4], cpu[4], lik, host_beta, red, grad)
                    got = OPS.elbo(*gpu[:4], gpu[4], lik, beta, red, grad)
                    c.compare(f"elbo {what} {red} grad={grad}", got, want, dt)
                if xs[0] == 0:
                    continue
                for red in ("mean", "sum"):
                    rc, rg = cpu[1].clone(), c.dev(cpu[1], layout == "offset")
                    want = OPS._elbo_into_recon(cpu[0], rc, *cpu[2:4], cpu[4], lik, host_beta, red)
                    got = OPS._elbo_into_recon(gpu[0], rg, *gpu[2:4], gpu[4], lik, beta, red)
                    c.compare(f"_elbo_into_recon {what} {red}", (*got, rg), (*want, rc), dt)


def run_single_ops(c: Checker, dtypes) -> None:
    for dt in dtypes:
        for shape, ed in SINGLE:
            x, lg, mean = c.rnd(shape, dt, 0, 1), c.rnd(shape, dt, -6, 6), c.rnd(shape, dt)
            g = c.rnd(shape[: len(shape) - ed], dt)
            for offset in (False, True):
                c.compare(
                    f"bernoulli_log_prob {shape} ed={ed} offset={offset}",
                    OPS.bernoulli_log_prob(c.dev(x, offset), c.dev(lg, offset), ed),
                    OPS.bernoulli_log_prob(x, lg, ed),
                    dt,
                )
            for mask in ([True, True], [False, True], [True, False]):
                c.compare(
                    f"bernoulli_bwd {shape} ed={ed} {mask}",
                    OPS._bernoulli_log_prob_backward(c.dev(g), c.dev(x), c.dev(lg), ed, mask),
                    OPS._bernoulli_log_prob_backward(g, x, lg, ed, mask),
                    dt,
                )
            lv_shapes = [(), shape[len(shape) - ed :] if ed else None, shape]
            lv_shapes.append((shape[-2], 1) if len(shape) > 2 else None)  # partly broadcast
            for lvs in filter(lambda s: s is not None, lv_shapes):
                lv = c.rnd(lvs, dt, -1, 1)
                c.compare(
                    f"gaussian_log_prob {shape} ed={ed} logvar{lvs}",
                    OPS.gaussian_log_prob(c.dev(x, True), c.dev(mean, True), c.dev(lv), ed),
                    OPS.gaussian_log_prob(x, mean, lv, ed),
                    dt,
                )
                for mask in ([True, True, True], [False, False, True]):
                    c.compare(
                        f"gaussian_bwd {shape} ed={ed} logvar{lvs} {mask}",
                        OPS._gaussian_log_prob_backward(
                            c.dev(g), c.dev(x), c.dev(mean), c.dev(lv), ed, mask
                        ),
                        OPS._gaussian_log_prob_backward(g, x, mean, lv, ed, mask),
                        dt,
                    )
        for B, Z in KL:
            mu, lv, g = c.rnd((B, Z), dt), c.rnd((B, Z), dt, -1, 1), c.rnd((B,), dt)
            priors = [
                (None, None),
                (c.rnd((Z,), dt), c.rnd((), dt, -1, 1)),  # per-feature, scalar
                (c.rnd((B, Z), dt), c.rnd((B, Z), dt, -1, 1)),  # per-element
                (c.rnd((Z,), dt).expand(B, Z), None),  # expanded
                (None, c.rnd((Z,), dt, -1, 1)),
            ]
            for k, (pm, plv) in enumerate(priors):
                c.compare(
                    f"gaussian_kl {B}x{Z} prior{k}",
                    OPS.gaussian_kl(c.dev(mu), c.dev(lv), c.dev(pm), c.dev(plv), 1),
                    OPS.gaussian_kl(mu, lv, pm, plv, 1),
                    dt,
                )
                for mask in ([True, True, True, True], [False, False, True, True]):
                    c.compare(
                        f"gaussian_kl_bwd {B}x{Z} prior{k} {mask}",
                        OPS._gaussian_kl_backward(
                            c.dev(g), c.dev(mu), c.dev(lv), c.dev(pm), c.dev(plv), 1, mask
                        ),
                        OPS._gaussian_kl_backward(g, mu, lv, pm, plv, 1, mask),
                        dt,
                    )


def run_reparameterize(c: Checker, dtypes) -> None:
    for dt in dtypes:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        for shape, ns, offset in REPARAMETERIZE:
            mu, lv = c.rnd(shape, dt), c.rnd(shape, dt, -1, 1)
            gen = torch.Generator(device=c.device).manual_seed(3)
            before = gen.get_state()
            z, eps = OPS.reparameterize(c.dev(mu, offset), c.dev(lv, offset), ns, generator=gen)
            name = f"reparameterize {shape} samples={ns} offset={offset}"
            if eps.dtype != acc or torch.equal(gen.get_state(), before):
                c.failures.append(f"{name}: eps dtype {eps.dtype} / generator not advanced")
            want = (mu.to(acc) + torch.exp(0.5 * lv.to(acc)) * eps.cpu()).to(dt)
            c.compare(name, z, want, dt)
            if z.numel():
                gz = c.rnd(z.shape, dt)
                for mask in ([True, True], [False, True]):
                    c.compare(
                        f"reparameterize_bwd {shape} samples={ns} {mask}",
                        OPS._reparameterize_backward(
                            c.dev(gz, offset), c.dev(lv, offset), eps, mask
                        ),
                        OPS._reparameterize_backward(gz, lv, eps.cpu(), mask),
                        dt,
                    )


def run_iwae(c: Checker, dtypes) -> None:
    for lik, K, xs, zs, estimator in IWAE:
        for dt in dtypes:
            x = (c.rnd(xs, dt, 0, 1) > 0.5).to(dt) if lik == "bernoulli" else c.rnd(xs, dt)
            recon, z = c.rnd((K, *xs), dt, -3, 3), c.rnd((K, *zs), dt)
            mu, lv = c.rnd(zs, dt), c.rnd(zs, dt, -1, 1)
            obs = c.rnd(xs[1:], dt, -0.5, 0.5) if lik == "gaussian" else None
            cpu = [x, recon, z, mu, lv, obs]
            for red in ("mean", "none"):
                want = OPS.iwae(*cpu, lik, estimator, red, True)
                got = OPS.iwae(*map(c.dev, cpu), lik, estimator, red, True)
                c.compare(f"iwae {lik} K={K} x{xs} {estimator} {red}", got, want, dt)


def profile(device: str) -> None:
    """The benchmark-sized elbo calls, once each, for a profiler to pick up."""
    for dt in (torch.float32, torch.bfloat16):
        for B, D, Z in ((65536, 784, 32), (4096, 12288, 128), (256, 49152, 256)):
            x = (torch.rand(B, D, device=device) < 0.5).to(dt)
            r, mu, lv = (torch.randn(s, device=device, dtype=dt) for s in ((B, D), (B, Z), (B, Z)))
            OPS.elbo(x, r, mu, lv, None, "bernoulli", torch.tensor(1.0), "mean", True, False)
    B, D = 65536, 784
    x, r = torch.randn(B, D, device=device), torch.randn(B, D, device=device)
    mu, lv, obs = (
        torch.randn(B, 32, device=device),
        torch.randn(B, 32, device=device),
        torch.randn(D, device=device),
    )
    OPS.elbo(x, r, mu, lv, obs, "gaussian", torch.tensor(1.0), "mean", True, False)
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--small", action="store_true", help="fewer cases (under a sanitizer)")
    parser.add_argument("--profile", action="store_true", help="only the benchmark-sized calls")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        from vae_fast import _C

        if not (torch.cuda.is_available() and _C.with_cuda):
            print("needs a GPU and a CUDA build of vae_fast", file=sys.stderr)
            return 2
    if args.profile:
        profile(args.device)
        return 0
    global ELBO, SINGLE, KL, IWAE
    if args.small:  # one case per path
        ELBO = [c for c in ELBO if c[1][0] <= 64 and c[1][-1] <= 12288]
        SINGLE, KL, IWAE = [((6, 5, 17), 1), ((300, 3, 130), 2)], [(300, 64), (7, 13)], IWAE[:1]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    c = Checker(args.device)
    for part in (run_elbo, run_single_ops, run_reparameterize, run_iwae):
        part(c, dtypes)
        print(
            f"{part.__name__}: {c.checked} outputs checked, {len(c.failures)} mismatches",
            flush=True,
        )
    for f in c.failures[:60]:
        print("MISMATCH", f)
    names = ",".join(str(d).removeprefix("torch.") for d in dtypes)
    print(
        f"DRIVER: {c.checked} outputs checked on {args.device} ({names}), "
        f"{len(c.failures)} mismatches vs CPU"
    )
    return 3 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
