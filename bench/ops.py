"""Times every vae_fast op against its peers, side by side in one run, and writes the results
as JSON.

For each op (the table OPS), size and pass (forward only, forward+backward) the providers
are vae_fast as users call it, vae_fast_inplace (elbo with inplace_grad=True, fed recon as
a decoder hands it over), the peers of bench/peers.py (eager torch, torch.distributions,
torch.compile) and the memory-bandwidth roofs, timed interleaved (median, 20th/80th
percentiles), with the bytes the ideal kernel must move, GB/s, the fraction of the roof,
speedups of vae_fast over each peer and the peak extra memory of a call, over the --sizes
and a batch-size and a feature-size sweep. bench/report.py makes the tables (printed here
too) and the plot of the sweeps from the JSON.

    python bench/ops.py                                     # CPU, float32, everything
    python bench/ops.py --quick                             # tiny sizes, < 1 minute
    python bench/ops.py --device cuda --json bench/results/ops_cuda.json --plot ops_cuda.png
    python bench/ops.py --ops elbo_bernoulli --sizes 8192x784x32 --no-sweep

See bench/README.md for what each column runs and how to read the output.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (after the path set-up, so `python bench/ops.py` works)
import _common as C  # noqa: E402
import _session as S  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
from _results import MODE_TITLE, PEERS, ROOFS  # noqa: E402

import vae_fast  # noqa: E402

ALL_PROVIDERS = ("vae_fast", "vae_fast_inplace", *PEERS, *ROOFS, "reference")
DEFAULT_PROVIDERS = ("vae_fast", "vae_fast_inplace", *PEERS, *ROOFS)
MODES = ("forward", "full")


class Size(NamedTuple):
    B: int  # batch
    D: int  # data features
    Z: int  # latent size

    def __str__(self) -> str:  # as --sizes takes it, and as the JSON's config holds it
        return f"{self.B}x{self.D}x{self.Z}"


# --------------------------------------------------------------------------- the ops


@dataclass
class Inputs:
    args: tuple[torch.Tensor, ...]  # in the op's argument order
    grad_out: torch.Tensor | None = None  # for ops whose output is not reduced (z)

    @property
    def leaves(self) -> list[torch.Tensor]:  # what requires grad (forward+backward only)
        return [t for t in self.args if t.requires_grad]


@dataclass(frozen=True)
class Draw:
    """Draws the random inputs of one case; `dims` are Size's letters ("BD": B x D), and a
    leaf requires grad when the case has a backward pass."""

    size: Size
    dtype: torch.dtype
    device: str
    grad: bool

    def normal(self, dims: str, scale: float = 1.0, leaf: bool = True) -> torch.Tensor:
        t = torch.randn(self._shape(dims), dtype=self.dtype, device=self.device)
        return (t * scale if scale != 1 else t).requires_grad_(self.grad and leaf)

    def binary(self, dims: str) -> torch.Tensor:
        return (torch.rand(self._shape(dims), device=self.device) < 0.5).to(self.dtype)

    def _shape(self, dims: str) -> tuple[int, ...]:
        return tuple(getattr(self.size, d) for d in dims)


@dataclass(frozen=True)
class Op:
    """One setup per op (Liger's `_setup_<kernel>`), shared by every provider and pass."""

    name: str
    feature: str  # which size the main tensors use besides B: "D" (data) or "Z" (latent)
    make: Callable[[Draw], Inputs]
    vae_fast: Callable
    reference: Callable
    eager: Callable
    distributions: Callable
    backward: str  # "loss": out[0].backward(); "sum": out.sum().backward(); "grad": out.backward(g)
    elements: Callable[[Size, str], int]  # elements the ideal kernel moves, per pass
    bytes_note: str
    inplace: Callable | None = None  # elbo(inplace_grad=True), fed a decoder-like recon

    def roof_elements(self, s: Size) -> int:
        """The op's main element count, on which its roof is measured."""
        return s.B * (s.D if self.feature == "D" else s.Z)


def _make_kl(d: Draw) -> Inputs:
    return Inputs((d.normal("BZ"), d.normal("BZ", 0.5)))  # mu, logvar


def _make_elbo_bernoulli(d: Draw) -> Inputs:
    x = d.binary("BD")
    return Inputs((d.normal("BD", 2), x, *_make_kl(d).args))  # elbo's order: recon, x, ...


def _make_elbo_gaussian(d: Draw) -> Inputs:
    x, recon = d.normal("BD", leaf=False), d.normal("BD")
    mu, logvar = _make_kl(d).args
    return Inputs((recon, x, mu, logvar, d.normal("D", 0.1)))  # obs_logvar: learnable, per feature


def _make_reparameterize(d: Draw) -> Inputs:
    return Inputs(_make_kl(d).args, grad_out=d.normal("BZ", leaf=False))


def _make_bernoulli_log_prob(d: Draw) -> Inputs:
    return Inputs((d.binary("BD"), d.normal("BD", 2)))  # x, logits


def _make_gaussian_log_prob(d: Draw) -> Inputs:
    x, mean = d.normal("BD", leaf=False), d.normal("BD")
    return Inputs((x, mean, d.normal("D", 0.1)))  # logvar per feature


def _elbo_gaussian(api):
    return lambda r, x, mu, lv, obs: api.elbo(r, x, mu, lv, likelihood="gaussian", obs_logvar=obs)


class _Decoded(torch.autograd.Function):
    """recon as a decoder hands it over: an existing buffer (the decoder allocated it
    in its forward) that is a non-leaf, and whose gradient the decoder's backward
    reads without storing it (as addmm's backward does). Costs no B×D work itself."""

    @staticmethod
    def forward(ctx, recon):
        return recon.detach()  # the same storage, not a view (which autograd would guard)

    @staticmethod
    def backward(ctx, grad):
        return None


def _elbo_inplace(**kwargs):
    def call(recon, x, mu, logvar, *obs):
        obs_kw = {"obs_logvar": obs[0]} if obs else {}
        if recon.requires_grad:  # (forward only: there is no gradient to write)
            recon = _Decoded.apply(recon)
        return vae_fast.elbo(recon, x, mu, logvar, inplace_grad=True, **kwargs, **obs_kw)

    return call


# Elements the ideal kernel must move (B-sized outputs are left out): each input read
# once, each output and gradient written once; forward+backward reads the inputs a
# single time, as a kernel that writes the gradient in the forward pass does.
def _elbo_elements(s: Size, mode: str) -> int:
    forward = 2 * s.B * s.D + 2 * s.B * s.Z
    return forward + (s.B * s.D + 2 * s.B * s.Z if mode == "full" else 0)


def _elbo_gaussian_elements(s: Size, mode: str) -> int:
    return _elbo_elements(s, mode) + (2 * s.D if mode == "full" else s.D)


# fmt: off
OPS: dict[str, Op] = {op.name: op for op in (
    Op(
        name="elbo_bernoulli", feature="D", make=_make_elbo_bernoulli, backward="loss",
        vae_fast=vae_fast.elbo, reference=vae_fast.reference.elbo,
        eager=peers.eager_elbo_bernoulli, distributions=peers.dist_elbo_bernoulli,
        inplace=_elbo_inplace(), elements=_elbo_elements,
        bytes_note="read x, recon, mu, logvar; fwd+bwd also writes d/d recon, mu, logvar",
    ),
    Op(
        name="elbo_gaussian", feature="D", make=_make_elbo_gaussian, backward="loss",
        vae_fast=_elbo_gaussian(vae_fast), reference=_elbo_gaussian(vae_fast.reference),
        eager=peers.eager_elbo_gaussian, distributions=peers.dist_elbo_gaussian,
        inplace=_elbo_inplace(likelihood="gaussian"), elements=_elbo_gaussian_elements,
        bytes_note="as elbo_bernoulli, plus the per-feature obs_logvar (D) and its gradient",
    ),
    Op(
        name="gaussian_kl", feature="Z", make=_make_kl, backward="sum",
        vae_fast=vae_fast.gaussian_kl, reference=vae_fast.reference.gaussian_kl,
        eager=peers.eager_gaussian_kl, distributions=peers.dist_gaussian_kl,
        elements=lambda s, mode: (4 if mode == "full" else 2) * s.B * s.Z,
        bytes_note="read mu, logvar; fwd+bwd also writes their gradients",
    ),
    Op(
        name="reparameterize", feature="Z", make=_make_reparameterize, backward="grad",
        vae_fast=vae_fast.reparameterize, reference=vae_fast.reference.reparameterize,
        eager=peers.eager_reparameterize, distributions=peers.dist_reparameterize,
        elements=lambda s, mode: (6 if mode == "full" else 3) * s.B * s.Z,
        bytes_note="read mu, logvar, write z (eps made in registers); bwd reads dz, "
        "logvar, writes d/d logvar (d/d mu is dz itself)",
    ),
    Op(
        name="bernoulli_log_prob", feature="D", make=_make_bernoulli_log_prob, backward="sum",
        vae_fast=vae_fast.bernoulli_log_prob, reference=vae_fast.reference.bernoulli_log_prob,
        eager=peers.eager_bernoulli_log_prob, distributions=peers.dist_bernoulli_log_prob,
        elements=lambda s, mode: (3 if mode == "full" else 2) * s.B * s.D,
        bytes_note="read x, logits; fwd+bwd also writes d/d logits",
    ),
    Op(
        name="gaussian_log_prob", feature="D", make=_make_gaussian_log_prob, backward="sum",
        vae_fast=vae_fast.gaussian_log_prob, reference=vae_fast.reference.gaussian_log_prob,
        eager=peers.eager_gaussian_log_prob, distributions=peers.dist_gaussian_log_prob,
        elements=lambda s, mode: 3 * s.B * s.D + 2 * s.D if mode == "full" else 2 * s.B * s.D + s.D,
        bytes_note="read x, mean, per-feature logvar; fwd+bwd also writes d/d mean, d/d logvar",
    ),
)}
# fmt: on


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Case:
    """One op at one size, dtype and pass: what every provider runs on the same inputs."""

    op: Op
    size: Size
    dtype: torch.dtype
    mode: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _with_backend(fn: Callable, backend: str) -> Callable:
    def call(*args):
        with vae_fast.backend(backend):
            return fn(*args)

    return call


def _own_recon(inputs: Inputs) -> Inputs:
    """The inputs with a recon of their own (elbo's first argument), made once: the
    in-place provider writes its gradient over recon, which the others must not read."""
    recon = inputs.args[0].detach().clone().requires_grad_(inputs.args[0].requires_grad)
    return Inputs((recon, *inputs.args[1:]), inputs.grad_out)


def make_step(op: Op, fn: Callable, inputs: Inputs, mode: str) -> Callable[[], object]:
    """One call as users make it: forward, or forward then backward into fresh .grad."""
    args = inputs.args
    if mode == "forward":
        return lambda: fn(*args)
    leaves, grad_out = inputs.leaves, inputs.grad_out

    def step():
        for t in leaves:  # optimizer.zero_grad(set_to_none=True), torch's default
            t.grad = None
        out = fn(*args)
        if op.backward == "loss":
            out[0].backward()
        elif op.backward == "sum":
            out.sum().backward()
        else:
            out.backward(grad_out)

    return step


def run_case(case: Case, suites: list[str], args, compiled, vae_backend: str) -> list[dict]:
    """One record per provider: its timing, bytes, GB/s, fraction of the roof and memory."""
    op, s, mode, device = case.op, case.size, case.mode, args.device
    inputs = op.make(Draw(s, case.dtype, device, mode == "full"))
    impls: dict[str, Callable | None] = {
        "vae_fast": _with_backend(op.vae_fast, vae_backend),
        "reference": op.reference,
        "eager": op.eager,
        "distributions": op.distributions,
        "compile": compiled.get(op.name),
        # elbo only, fused only: the gradient written over recon
        "vae_fast_inplace": op.inplace if vae_backend == "fused" and mode == "full" else None,
    }
    steps = {
        p: make_step(op, impls[p], _own_recon(inputs) if p == "vae_fast_inplace" else inputs, mode)
        for p in args.providers
        if p not in ROOFS and impls[p] is not None
    }
    roofs = None
    if set(ROOFS) & set(args.providers):
        roofs = peers.make_roofs(op.roof_elements(s), case.dtype, device)
        steps.update({p: fn for p, fn in roofs.fns.items() if p in args.providers})
    timings = C.measure_interleaved(
        steps, device=device, min_time=args.min_time, rounds=args.rounds, warmup=args.warmup
    )
    size = torch.empty((), dtype=case.dtype).element_size()
    ideal_bytes = op.elements(s, mode) * size
    roof_gbps = None
    if "median_s" in timings.get("roof", {}):
        roof_gbps = roofs.bytes / timings["roof"]["median_s"] / 1e9
    base = {
        "op": op.name,
        "mode": mode,
        **s._asdict(),
        "dtype": case.dtype_name,
        "device": device,
        "suites": suites,
        "ideal_bytes": ideal_bytes,
        "one_grad_bytes": op.roof_elements(s) * size,
        "roof_gbps": roof_gbps,
    }
    records = []
    for provider, timing in timings.items():
        rec = {**base, "provider": provider, **timing}
        if "median_s" in timing:
            moved = roofs.bytes if provider in ROOFS else ideal_bytes
            rec["bytes"] = moved
            rec["gbps"] = moved / timing["median_s"] / 1e9
            rec["frac_roof"] = rec["gbps"] / roof_gbps if roof_gbps else None
            if provider in ROOFS:
                rec["roof_kind"] = roofs.kind
            elif not args.no_memory:
                for t in inputs.leaves:
                    t.grad = None
                rec.update(C.peak_extra_memory(steps[provider], device))
        records.append(rec)
    mine = next((r for r in records if r["provider"] == "vae_fast" and "median_s" in r), None)
    if mine is not None:
        others = [r for r in records if r["provider"] in (*PEERS, "reference") and "median_s" in r]
        mine["speedup"] = {r["provider"]: r["median_s"] / mine["median_s"] for r in others}
        mine["speedup_spread"] = {r["provider"]: C.ratio_spread(r, mine) for r in others}
    for t in inputs.leaves:
        t.grad = None
    return records


def build_cases(args) -> dict[Case, list[str]]:
    """Every case of the run, in run order, with the suites it belongs to."""
    cases: dict[Case, list[str]] = {}

    def add(op_name: str, size: Size, dtype: torch.dtype, mode: str, suite: str) -> None:
        suites = cases.setdefault(Case(OPS[op_name], size, dtype, mode), [])
        if suite not in suites:
            suites.append(suite)

    for dtype in (S.DTYPES[d] for d in args.dtype):
        for size in args.sizes:
            for op_name in args.ops:
                for mode in args.modes:
                    add(op_name, size, dtype, mode, "sizes")
        if args.no_sweep:
            continue
        for op_name in args.sweep_ops:
            for mode in args.sweep_modes:
                for B in args.batch_sizes:
                    add(op_name, Size(B, args.sweep_d, args.sweep_z), dtype, mode, "batch_sweep")
                if OPS[op_name].feature == "D":  # a D sweep means nothing to the latent ops
                    for D in args.feature_sizes:
                        size = Size(args.sweep_b, D, args.sweep_z)
                        add(op_name, size, dtype, mode, "feature_sweep")
    return cases


# --------------------------------------------------------------------------- CLI


def parse_size(text: str) -> Size:
    try:
        return Size(*(int(v) for v in text.lower().split("x")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected BxDxZ, e.g. 8192x784x32"
        ) from None


def parse_args(argv=None) -> argparse.Namespace:
    Later = _cli.Later
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_cli.HelpFormatter
    )
    p.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=sorted(S.DTYPES), help="one or more"
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=Later([Size(8192, 784, 32), Size(4096, 12288, 128)], quick=[Size(256, 784, 32)]),
        help="BxDxZ: batch x data features x latent size",
    )
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="which ops")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which passes")
    p.add_argument(
        "--providers",
        nargs="+",
        choices=ALL_PROVIDERS,
        # torch.compile's cold compiles alone (one per op, pass and shape) take minutes
        default=Later(
            list(DEFAULT_PROVIDERS), quick=[p for p in DEFAULT_PROVIDERS if p != "compile"]
        ),
        help="which columns",
    )
    p.add_argument("--no-sweep", action="store_true", help="only the --sizes")
    p.add_argument(
        "--sweep-ops", nargs="+", choices=list(OPS), default=["elbo_bernoulli"], help="swept ops"
    )
    p.add_argument("--sweep-modes", nargs="+", choices=MODES, default=["full"], help="swept passes")
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=Later(
            [256, 1024, 4096, 16384, 65536],
            quick=[64, 256],
            cuda=[256, 1024, 4096, 16384, 65536, 262144],
        ),
        help="batch sweep over B (D, Z fixed)",
    )
    p.add_argument(
        "--feature-sizes",
        nargs="+",
        type=int,
        default=Later([64, 256, 784, 3072, 12288], quick=[64, 256]),
        help="feature sweep over D (B, Z fixed)",
    )
    p.add_argument(
        "--sweep-b", type=int, default=Later(4096, quick=64), help="B of the feature sweep"
    )
    p.add_argument("--sweep-d", type=int, default=784, help="D of the batch sweep")
    p.add_argument("--sweep-z", type=int, default=32, help="Z of both sweeps")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--plot", help="PNG of the sweeps: time and GB/s against size")
    _cli.add_run_options(
        p,
        runs="the vae_fast provider runs",
        per="provider and case",
        quick="tiny sizes and short timings, no torch.compile: checks the script, not the kernels",
        min_time=Later(1.0, quick=0.02),
        warmup=Later(2, quick=1),
    )
    args = _cli.fill_defaults(p.parse_args(argv))
    args.providers = [p for p in ALL_PROVIDERS if p in args.providers]  # a fixed column order
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    session = S.Session.begin(args, compile="compile" in args.providers)
    compiled = (
        {name: peers.compiled(op.eager) for name, op in OPS.items()}
        if "compile" in args.providers
        else {}
    )
    cases = build_cases(args)
    records: list[dict] = []
    for i, (case, suites) in enumerate(cases.items(), 1):
        t0 = time.perf_counter()
        recs = run_case(case, suites, args, compiled, session.vae_backend)
        records += recs
        mine = next((r for r in recs if r["provider"] == "vae_fast"), {})
        summary = " ".join(
            f"{r['provider']}={report.fmt_ms(r['median_s'])}ms"
            if "median_s" in r
            else f"{r['provider']}=ERROR({r['error']})"
            for r in recs
        )
        frac = mine.get("frac_roof")
        print(
            f"[{i}/{len(cases)}] {case.op.name} {MODE_TITLE[case.mode]} {case.size} "
            f"{case.dtype_name}: {summary}"
            + (f" | vae_fast {100 * frac:.0f}% of roof" if frac else "")
            + f" ({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    config = {**S.options(args), "sizes": [str(s) for s in args.sizes]}
    bytes_formulas = {name: op.bytes_note for name, op in OPS.items()}
    run = session.finish("ops", config, records, bytes_formulas=bytes_formulas)
    if args.json:
        S.write_json(args.json, run, args.append)
    report.publish(run, args.markdown, args.plot)
    return run


if __name__ == "__main__":
    main()
