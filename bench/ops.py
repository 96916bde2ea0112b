"""Throughput of every vae_fast op against its peers, side by side in one run.

For each op, size and pass (forward only, forward+backward) the providers are

  vae_fast       the op as users call it (output and gradient allocation included),
  vae_fast_inplace  elbo only, forward+backward: elbo(inplace_grad=True), the gradient
                 written over recon (handed over as a decoder's output: no B x D copy),
  eager          plain torch written the usual way (F.binary_cross_entropy_with_logits,
                 the KL formula, mu + std * randn_like),
  distributions  torch.distributions (Bernoulli / Normal log_prob, kl_divergence, rsample),
  compile        torch.compile of the eager function (compiled during the warm-up),
  roof           the memory-bandwidth roof on the op's main element count: a triad
                 torch.add(p, q, out=r) on the CPU, a device-to-device copy on CUDA,
  roof_alloc     the same into a fresh output (torch.add(p, q), p.clone()): the
                 difference is what allocating a B x D result costs,

timed interleaved (median, 20th/80th percentiles), with the bytes the ideal kernel
must move, GB/s, the fraction of the roof, speedups of vae_fast over each peer and the
peak extra memory of a call. A batch-size and a feature-size sweep are plotted.

    python bench/ops.py                                     # CPU, float32, everything
    python bench/ops.py --quick                             # tiny sizes, < 1 minute
    python bench/ops.py --device cuda --json bench/results/ops_cuda.json --plot ops_cuda.png
    python bench/ops.py --ops elbo_bernoulli --sizes 8192x784x32 --no-sweep

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (after the path set-up, so `python bench/ops.py` works)

import vae_fast  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)
PEERS = ("eager", "distributions", "compile")
ROOFS = ("roof", "roof_alloc")
ALL_PROVIDERS = ("vae_fast", "vae_fast_inplace", *PEERS, *ROOFS, "reference")
DEFAULT_PROVIDERS = ("vae_fast", "vae_fast_inplace", *PEERS, *ROOFS)
MODES = ("forward", "full")
MODE_TITLE = {"forward": "fwd", "full": "fwd+bwd"}


# --------------------------------------------------------------------------- the peers
# Written the way a user would write them, not tuned: this is what vae_fast replaces.


def eager_elbo_bernoulli(recon, x, mu, logvar):
    bce = F.binary_cross_entropy_with_logits(recon, x, reduction="none").sum(-1)
    kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(-1)
    return (bce + kl).mean(), -bce, kl


def dist_elbo_bernoulli(recon, x, mu, logvar):
    ll = Bernoulli(logits=recon).log_prob(x).sum(-1)
    posterior = Normal(mu, (0.5 * logvar).exp())
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = kl_divergence(posterior, prior).sum(-1)
    return (kl - ll).mean(), ll, kl


def eager_elbo_gaussian(recon, x, mu, logvar, obs_logvar):
    ll = (-0.5 * (LOG_2PI + obs_logvar + (x - recon).pow(2) / obs_logvar.exp())).sum(-1)
    kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(-1)
    return (kl - ll).mean(), ll, kl


def dist_elbo_gaussian(recon, x, mu, logvar, obs_logvar):
    ll = Normal(recon, (0.5 * obs_logvar).exp()).log_prob(x).sum(-1)
    posterior = Normal(mu, (0.5 * logvar).exp())
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = kl_divergence(posterior, prior).sum(-1)
    return (kl - ll).mean(), ll, kl


def eager_gaussian_kl(mu, logvar):
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(-1)


def dist_gaussian_kl(mu, logvar):
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return kl_divergence(Normal(mu, (0.5 * logvar).exp()), prior).sum(-1)


def eager_reparameterize(mu, logvar):
    std = torch.exp(0.5 * logvar)
    return mu + std * torch.randn_like(std)


def dist_reparameterize(mu, logvar):
    return Normal(mu, (0.5 * logvar).exp()).rsample()


def eager_bernoulli_log_prob(x, logits):
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def dist_bernoulli_log_prob(x, logits):
    return Bernoulli(logits=logits).log_prob(x).sum(-1)


def eager_gaussian_log_prob(x, mean, logvar):
    return (-0.5 * (LOG_2PI + logvar + (x - mean).pow(2) / logvar.exp())).sum(-1)


def dist_gaussian_log_prob(x, mean, logvar):
    return Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(-1)


# --------------------------------------------------------------------------- the ops


@dataclass
class Inputs:
    args: tuple[torch.Tensor, ...]
    leaves: list[torch.Tensor]  # what requires grad (forward+backward only)
    grad_out: torch.Tensor | None = None  # for ops whose output is not reduced (z)


@dataclass(frozen=True)
class Op:
    """One setup per op (Liger's `_setup_<kernel>`), shared by every provider and pass."""

    name: str
    feature: str  # which size the main tensors use besides B: "D" (data) or "Z" (latent)
    make: Callable[[int, int, int, torch.dtype, str, bool], Inputs]
    vae_fast: Callable
    reference: Callable
    eager: Callable
    distributions: Callable
    backward: str  # "loss": out[0].backward(); "sum": out.sum().backward(); "grad": out.backward(g)
    elements: Callable[[int, int, int, str], int]  # elements the ideal kernel moves, per pass
    bytes_note: str
    inplace: Callable | None = None  # elbo(inplace_grad=True), fed a decoder-like recon


def _binary(shape, dtype, device):
    return (torch.rand(shape, device=device) < 0.5).to(dtype)


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.requires_grad_(grad)


def _make_elbo_bernoulli(B, D, Z, dtype, device, grad):
    kw = {"dtype": dtype, "device": device}
    x = _binary((B, D), dtype, device)
    recon = _leaf(torch.randn(B, D, **kw) * 2, grad)
    mu = _leaf(torch.randn(B, Z, **kw), grad)
    logvar = _leaf(torch.randn(B, Z, **kw) * 0.5, grad)
    return Inputs((recon, x, mu, logvar), [recon, mu, logvar])  # elbo's order: recon, x


def _make_elbo_gaussian(B, D, Z, dtype, device, grad):
    kw = {"dtype": dtype, "device": device}
    x = torch.randn(B, D, **kw)
    recon = _leaf(torch.randn(B, D, **kw), grad)
    mu = _leaf(torch.randn(B, Z, **kw), grad)
    logvar = _leaf(torch.randn(B, Z, **kw) * 0.5, grad)
    obs_logvar = _leaf(torch.randn(D, **kw) * 0.1, grad)  # learnable, per feature
    return Inputs((recon, x, mu, logvar, obs_logvar), [recon, mu, logvar, obs_logvar])


def _make_kl(B, D, Z, dtype, device, grad):
    kw = {"dtype": dtype, "device": device}
    mu = _leaf(torch.randn(B, Z, **kw), grad)
    logvar = _leaf(torch.randn(B, Z, **kw) * 0.5, grad)
    return Inputs((mu, logvar), [mu, logvar])


def _make_reparameterize(B, D, Z, dtype, device, grad):
    inputs = _make_kl(B, D, Z, dtype, device, grad)
    inputs.grad_out = torch.randn(B, Z, dtype=dtype, device=device)
    return inputs


def _make_bernoulli_log_prob(B, D, Z, dtype, device, grad):
    x = _binary((B, D), dtype, device)
    logits = _leaf(torch.randn(B, D, dtype=dtype, device=device) * 2, grad)
    return Inputs((x, logits), [logits])


def _make_gaussian_log_prob(B, D, Z, dtype, device, grad):
    kw = {"dtype": dtype, "device": device}
    x = torch.randn(B, D, **kw)
    mean = _leaf(torch.randn(B, D, **kw), grad)
    logvar = _leaf(torch.randn(D, **kw) * 0.1, grad)  # per feature
    return Inputs((x, mean, logvar), [mean, logvar])


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
def _elbo_elements(B, D, Z, mode):
    forward = 2 * B * D + 2 * B * Z
    return forward + (B * D + 2 * B * Z if mode == "full" else 0)


def _elbo_gaussian_elements(B, D, Z, mode):
    return _elbo_elements(B, D, Z, mode) + (2 * D if mode == "full" else D)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            name="elbo_bernoulli",
            feature="D",
            make=_make_elbo_bernoulli,
            vae_fast=vae_fast.elbo,
            reference=vae_fast.reference.elbo,
            eager=eager_elbo_bernoulli,
            distributions=dist_elbo_bernoulli,
            backward="loss",
            elements=_elbo_elements,
            bytes_note="read x, recon, mu, logvar; fwd+bwd also writes d/d recon, mu, logvar",
            inplace=_elbo_inplace(),
        ),
        Op(
            name="elbo_gaussian",
            feature="D",
            make=_make_elbo_gaussian,
            vae_fast=_elbo_gaussian(vae_fast),
            reference=_elbo_gaussian(vae_fast.reference),
            eager=eager_elbo_gaussian,
            distributions=dist_elbo_gaussian,
            backward="loss",
            elements=_elbo_gaussian_elements,
            bytes_note="as elbo_bernoulli, plus the per-feature obs_logvar (D) and its gradient",
            inplace=_elbo_inplace(likelihood="gaussian"),
        ),
        Op(
            name="gaussian_kl",
            feature="Z",
            make=_make_kl,
            vae_fast=vae_fast.gaussian_kl,
            reference=vae_fast.reference.gaussian_kl,
            eager=eager_gaussian_kl,
            distributions=dist_gaussian_kl,
            backward="sum",
            elements=lambda B, D, Z, mode: (4 if mode == "full" else 2) * B * Z,
            bytes_note="read mu, logvar; fwd+bwd also writes their gradients",
        ),
        Op(
            name="reparameterize",
            feature="Z",
            make=_make_reparameterize,
            vae_fast=vae_fast.reparameterize,
            reference=vae_fast.reference.reparameterize,
            eager=eager_reparameterize,
            distributions=dist_reparameterize,
            backward="grad",
            elements=lambda B, D, Z, mode: (6 if mode == "full" else 3) * B * Z,
            bytes_note="read mu, logvar, write z (eps made in registers); bwd reads dz, "
            "logvar, writes d/d logvar (d/d mu is dz itself)",
        ),
        Op(
            name="bernoulli_log_prob",
            feature="D",
            make=_make_bernoulli_log_prob,
            vae_fast=vae_fast.bernoulli_log_prob,
            reference=vae_fast.reference.bernoulli_log_prob,
            eager=eager_bernoulli_log_prob,
            distributions=dist_bernoulli_log_prob,
            backward="sum",
            elements=lambda B, D, Z, mode: (3 if mode == "full" else 2) * B * D,
            bytes_note="read x, logits; fwd+bwd also writes d/d logits",
        ),
        Op(
            name="gaussian_log_prob",
            feature="D",
            make=_make_gaussian_log_prob,
            vae_fast=vae_fast.gaussian_log_prob,
            reference=vae_fast.reference.gaussian_log_prob,
            eager=eager_gaussian_log_prob,
            distributions=dist_gaussian_log_prob,
            backward="sum",
            elements=lambda B, D, Z, mode: (3 * B * D + 2 * D) if mode == "full" else 2 * B * D + D,
            bytes_note="read x, mean, per-feature logvar; fwd+bwd also writes d/d mean, d/d logvar",
        ),
    )
}


def roof_elements(op: Op, B: int, D: int, Z: int) -> int:
    return B * (D if op.feature == "D" else Z)


# --------------------------------------------------------------------------- providers


@dataclass
class Case:
    op: Op
    B: int
    D: int
    Z: int
    dtype: torch.dtype
    mode: str
    suites: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.op.name, self.B, self.D, self.Z, self.dtype, self.mode)

    @property
    def size(self) -> str:
        return f"{self.B}x{self.D}x{self.Z}"


def _with_backend(fn: Callable, backend: str) -> Callable:
    def call(*args):
        with vae_fast.backend(backend):
            return fn(*args)

    return call


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


def make_roofs(n: int, dtype: torch.dtype, device: str) -> tuple[dict[str, Callable], int, str]:
    """The bandwidth roof on n elements, into a reused and into a fresh output.

    Returns ({"roof": ..., "roof_alloc": ...}, the bytes each moves, its name).
    """
    p = torch.rand(n, dtype=dtype, device=device)
    q = torch.rand(n, dtype=dtype, device=device)
    r = torch.empty(n, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    if device == "cuda":
        return {"roof": lambda: r.copy_(p), "roof_alloc": lambda: p.clone()}, 2 * n * size, "copy"
    fns = {"roof": lambda: torch.add(p, q, out=r), "roof_alloc": lambda: torch.add(p, q)}
    return fns, 3 * n * size, "triad"


# --------------------------------------------------------------------------- running


def run_case(case: Case, args, providers, compiled, vae_backend) -> list[dict]:
    op, B, D, Z, dtype, mode = case.op, case.B, case.D, case.Z, case.dtype, case.mode
    device = args.device
    inputs = op.make(B, D, Z, dtype, device, mode == "full")
    impls: dict[str, Callable] = {
        "vae_fast": _with_backend(op.vae_fast, vae_backend),
        "reference": op.reference,
        "eager": op.eager,
        "distributions": op.distributions,
        "compile": compiled.get(op.name),
        # elbo only, fused only: the gradient written over recon
        "vae_fast_inplace": op.inplace if vae_backend == "fused" and mode == "full" else None,
    }
    steps = {
        p: make_step(op, impls[p], inputs, mode)
        for p in providers
        if p not in ROOFS and impls[p] is not None
    }
    roof_bytes, roof_name = None, None
    if set(ROOFS) & set(providers):
        roofs, roof_bytes, roof_name = make_roofs(roof_elements(op, B, D, Z), dtype, device)
        steps.update({p: fn for p, fn in roofs.items() if p in providers})
    timings = C.measure_interleaved(
        steps, device=device, min_time=args.min_time, rounds=args.rounds, warmup=args.warmup
    )
    size = torch.empty((), dtype=dtype).element_size()
    ideal_bytes = op.elements(B, D, Z, mode) * size
    grad_bytes = roof_elements(op, B, D, Z) * size
    roof_gbps = None
    if "roof" in timings and "median_s" in timings["roof"]:
        roof_gbps = roof_bytes / timings["roof"]["median_s"] / 1e9
    base = {
        "op": op.name,
        "mode": mode,
        "B": B,
        "D": D,
        "Z": Z,
        "dtype": str(dtype).split(".")[1],
        "device": device,
        "suites": case.suites,
        "ideal_bytes": ideal_bytes,
        "one_grad_bytes": grad_bytes,
        "roof_gbps": roof_gbps,
    }
    records = []
    for provider, timing in timings.items():
        rec = {**base, "provider": provider, **timing}
        if "median_s" in timing:
            moved = roof_bytes if provider in ROOFS else ideal_bytes
            rec["bytes"] = moved
            rec["gbps"] = moved / timing["median_s"] / 1e9
            rec["frac_roof"] = rec["gbps"] / roof_gbps if roof_gbps else None
            if provider in ROOFS:
                rec["roof_kind"] = roof_name
            elif not args.no_memory:
                for t in inputs.leaves:
                    t.grad = None
                rec.update(C.peak_extra_memory(steps[provider], device))
        records.append(rec)
    mine = next((r for r in records if r["provider"] == "vae_fast" and "median_s" in r), None)
    if mine is not None:
        mine["speedup"] = {
            r["provider"]: r["median_s"] / mine["median_s"]
            for r in records
            if r["provider"] in (*PEERS, "reference") and "median_s" in r
        }
    for t in inputs.leaves:
        t.grad = None
    return records


def build_cases(args) -> list[Case]:
    cases: dict[tuple, Case] = {}

    def add(op_name, B, D, Z, dtype, mode, suite):
        case = Case(OPS[op_name], B, D, Z, dtype, mode)
        case = cases.setdefault(case.key, case)
        if suite not in case.suites:
            case.suites.append(suite)

    for dtype in args.dtypes:
        for size in args.sizes:
            B, D, Z = size
            for op_name in args.ops:
                for mode in args.modes:
                    add(op_name, B, D, Z, dtype, mode, "sizes")
        if args.no_sweep:
            continue
        for op_name in args.sweep_ops:
            for mode in args.sweep_modes:
                for B in args.batch_sizes:
                    add(op_name, B, args.sweep_d, args.sweep_z, dtype, mode, "batch_sweep")
                if OPS[op_name].feature == "D":  # a D sweep means nothing to the latent ops
                    for D in args.feature_sizes:
                        add(op_name, args.sweep_b, D, args.sweep_z, dtype, mode, "feature_sweep")
    return list(cases.values())


# --------------------------------------------------------------------------- reporting


def _ok(records, **match):
    return [r for r in records if "median_s" in r and all(r.get(k) == v for k, v in match.items())]


def _get(records, provider, **match):
    found = _ok(records, provider=provider, **match)
    return found[0] if found else None


def _configs(records, suite=None, **match):
    """The distinct (op, dtype, B, D, Z, mode) cases among `records`, in run order."""
    seen, out = set(), []
    for r in _ok(records, **match):
        key = (r["op"], r["dtype"], r["B"], r["D"], r["Z"], r["mode"])
        if key not in seen and (suite is None or suite in r["suites"]):
            seen.add(key)
            out.append(key)
    return out


def _match(key) -> dict:
    return dict(zip(("op", "dtype", "B", "D", "Z", "mode"), key))


def provider_titles(meta: dict) -> dict[str, str]:
    kind = "copy" if meta["device"] == "cuda" else "triad"
    label = "vae_fast" if meta["vae_fast_backend"] == "fused" else "vae_fast [reference stand-in]"
    return {
        "vae_fast": label,
        "vae_fast_inplace": "vae_fast, inplace_grad",
        "reference": "reference",
        "eager": "eager",
        "distributions": "torch.distributions",
        "compile": "torch.compile",
        "roof": f"roof ({kind})",
        "roof_alloc": f"{kind}, fresh out",
    }


def _mb(b):
    return "–" if b is None else f"{b / 2**20:.1f}"


def _peak_cell(rec: dict | None) -> str:
    if not rec or "peak_bytes" not in rec:
        return "–"
    return f"{_mb(rec['peak_bytes'])} ({_mb(rec.get('transient_bytes'))})"


def markdown(run: dict) -> str:
    meta, records = run["meta"], run["results"]
    providers = [p for p in run["config"]["providers"]]
    titles = provider_titles(meta)
    peers = [p for p in providers if p in (*PEERS, "reference")]
    out = [f"Machine: {C.machine_line(meta)}", ""]
    if meta["vae_fast_backend"] != "fused":
        out += [
            "**vae_fast._C was not built: the vae_fast column ran the reference (plain torch) "
            "backend as a stand-in. These numbers say nothing about the fused kernels.**",
            "",
        ]

    def time_row(r_key):
        match = _match(r_key)
        B, D, Z = r_key[2:5]
        mine = _get(records, "vae_fast", **match)
        cells = [fmt_size(B, D, Z)]
        for p in providers:
            rec = _get(records, p, **match)
            cells.append(C.fmt_ms(rec["median_s"]) if rec else "–")
        cells.append(f"{mine['gbps']:.3g}" if mine else "–")
        frac = mine.get("frac_roof") if mine else None
        cells.append(f"{100 * frac:.0f}%" if frac is not None else "–")
        for p in peers:
            cells.append(C.fmt_ratio(mine["speedup"].get(p)) if mine and "speedup" in mine else "–")
        return cells

    time_header = (
        ["B×D×Z"]
        + [f"{titles[p]} ms" for p in providers]
        + ["vae_fast GB/s", "of roof"]
        + [f"vs {titles[p]}" for p in peers]
    )

    headline = _configs(records, "sizes", op="elbo_bernoulli", mode="full")
    if headline:
        out += [f"### elbo (Bernoulli, mean), forward+backward, {meta['device']}", ""]
        rows = []
        for k in headline:
            row = time_row(k)
            row[0] = f"{row[0]} {k[1]}"
            rows.append(row)
        out += [C.md_table(time_header, rows), ""]

    out += ["### Every op", ""]
    header = ["op", "pass"] + time_header
    rows = []
    for k in _configs(records, "sizes"):
        row = time_row(k)
        row[0] = f"{row[0]} {k[1]}"
        rows.append([k[0], MODE_TITLE[k[5]]] + row)
    out += [C.md_table(header, rows), ""]

    mem_providers = [p for p in providers if p not in ROOFS]
    mem_rows = []
    for k in _configs(records, "sizes", mode="full"):
        match = _match(k)
        recs = {p: _get(records, p, **match) for p in mem_providers}
        if not any(r and "peak_bytes" in r for r in recs.values()):
            continue
        any_rec = next(r for r in recs.values() if r)
        mine, eager = recs.get("vae_fast"), recs.get("eager")
        ratio = (
            eager["peak_bytes"] / mine["peak_bytes"]
            if mine and eager and mine.get("peak_bytes") and eager.get("peak_bytes")
            else None
        )
        mem_rows.append(
            [k[0], f"{fmt_size(k[2], k[3], k[4])} {k[1]}", _mb(any_rec["one_grad_bytes"])]
            + [_peak_cell(recs[p]) for p in mem_providers]
            + [C.fmt_ratio(ratio)]
        )
    if mem_rows:
        out += [
            "### Peak extra memory of forward+backward, MiB (in brackets: the part freed "
            "by the end of the call; the rest is the gradients left in .grad)",
            "",
            C.md_table(
                ["op", "B×D×Z", "one gradient"]
                + [titles[p] for p in mem_providers]
                + ["eager / vae_fast"],
                mem_rows,
            ),
            "",
        ]

    for suite, axis in (("batch_sweep", "B"), ("feature_sweep", "D")):
        for op_name in dict.fromkeys(r["op"] for r in records if suite in r["suites"]):
            for mode in dict.fromkeys(r["mode"] for r in records if suite in r["suites"]):
                keys = sorted(
                    _configs(records, suite, op=op_name, mode=mode),
                    key=lambda k: (k[1], k[2] if axis == "B" else k[3]),
                )
                if not keys:
                    continue
                out += [f"### Scaling over {axis}: {op_name}, {MODE_TITLE[mode]}", ""]
                rows = [time_row(k) for k in keys]
                for row, k in zip(rows, keys):
                    row[0] = f"{row[0]} {k[1]}"
                out += [C.md_table(time_header, rows), ""]
    checks = targets(records)
    if checks:
        out += ["### Targets of issues 3 and 5 in this run", "", *checks, ""]
    return "\n".join(out)


def targets(records: list[dict]) -> list[str]:
    """The issues' targets, checked against this run's float32 results where it has them."""
    lines = []

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def mine(op, B, D, Z, mode="full"):
        return _get(records, "vae_fast", op=op, B=B, D=D, Z=Z, mode=mode, dtype="float32")

    def ratio_check(rec, peer, least):
        r = rec.get("speedup", {}).get(peer)
        return None if r is None else (f"{r:.1f}× {peer} (≥ {least}×)", r >= least)

    for (B, D, Z), wants in (
        ((8192, 784, 32), [("frac_roof", 0.5), ("eager", 8), ("compile", 3)]),
        ((4096, 12288, 128), [("eager", 4), ("compile", 1.5)]),
    ):
        rec = mine("elbo_bernoulli", B, D, Z)
        if rec is None:
            continue
        parts = []
        for what, least in wants:
            if what == "frac_roof":
                if rec.get("frac_roof") is not None:
                    frac = rec["frac_roof"]
                    parts.append((f"{100 * frac:.0f}% of the roof (≥ 50%)", frac >= least))
            else:
                found = ratio_check(rec, what, least)
                if found:
                    parts.append(found)
        if parts:
            text = "; ".join(f"{t}: {mark(ok)}" for t, ok in parts)
            lines.append(f"- elbo fwd+bwd {fmt_size(B, D, Z)}: {text}")

    for suite in ("batch_sweep", "feature_sweep"):
        keys = _configs(records, suite, op="elbo_bernoulli", mode="full", dtype="float32")
        behind = []
        for k in keys:
            rec = _get(records, "vae_fast", **_match(k))
            if rec and "speedup" in rec and any(v < 1 for v in rec["speedup"].values()):
                slower = [p for p, v in rec["speedup"].items() if v < 1]
                behind.append(f"{fmt_size(*k[2:5])} (behind {', '.join(slower)})")
        if keys:
            lines.append(
                f"- elbo fwd+bwd ahead of every peer over the {suite.replace('_', ' ')} "
                f"({len(keys)} sizes): {mark(not behind)}"
                + (f"; behind at {'; '.join(behind)}" if behind else "")
            )

    for k in _configs(records, "sizes", op="elbo_bernoulli", mode="full", dtype="float32"):
        rec = _get(records, "vae_fast", **_match(k))
        eager = _get(records, "eager", **_match(k))
        if rec and eager and rec.get("peak_bytes") and eager.get("peak_bytes"):
            B, D, Z = k[2:5]
            grads = rec["peak_bytes"] / rec["one_grad_bytes"]
            allowed = 1 + 2 * Z / D  # the B×D gradient and the two B×Z ones of mu, logvar
            less = eager["peak_bytes"] / rec["peak_bytes"]
            lines.append(
                f"- elbo fwd+bwd {fmt_size(B, D, Z)} peak extra memory: {grads:.3f} B×D "
                f"gradients (≤ {allowed:.3f} with the mu/logvar ones): "
                f"{mark(grads <= allowed * 1.01)}; {less:.1f}× less than eager (≥ 3×): "
                f"{mark(less >= 3)}; transient {_mb(rec.get('transient_bytes'))} MiB against "
                f"eager's {_mb(eager.get('transient_bytes'))} MiB"
            )

    for op in ("reparameterize", "gaussian_kl"):
        for k in _configs(records, "sizes", op=op, mode="full", dtype="float32"):
            rec = _get(records, "vae_fast", **_match(k))
            got = [
                (p, rec["speedup"][p]) for p in ("eager", "compile") if p in rec.get("speedup", {})
            ]
            if got:
                text = ", ".join(f"{v:.1f}× {p}" for p, v in got)
                lines.append(
                    f"- {op} fwd+bwd {fmt_size(*k[2:5])}: {text} (ahead of each): "
                    f"{mark(all(v >= 1 for _, v in got))}"
                )
    return lines


def fmt_size(B, D, Z):
    return f"{B}×{D}×{Z}"


def plot(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run["results"]
    titles = provider_titles(run["meta"])
    panels = []  # (op, mode, dtype)
    for r in records:
        if {"batch_sweep", "feature_sweep"} & set(r["suites"]):
            key = (r["op"], r["mode"], r["dtype"])
            if key not in panels:
                panels.append(key)
    if not panels:
        print("--plot: no sweep in this run, nothing to plot", file=sys.stderr)
        return
    suites = [("batch_sweep", "B", "batch size B"), ("feature_sweep", "D", "feature size D")]
    fig, axes = plt.subplots(2 * len(panels), 2, figsize=(11, 4.2 * 2 * len(panels)), squeeze=False)
    for i, (op, mode, dtype) in enumerate(panels):
        for j, (suite, axis, xlabel) in enumerate(suites):
            ax_t, ax_g = axes[2 * i][j], axes[2 * i + 1][j]
            for provider in run["config"]["providers"]:
                pts = sorted(
                    (r[axis], r)
                    for r in _ok(records, op=op, mode=mode, dtype=dtype, provider=provider)
                    if suite in r["suites"]
                )
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                med = [r["median_s"] * 1e3 for _, r in pts]
                lo = [m - r["p20_s"] * 1e3 for m, (_, r) in zip(med, pts)]
                hi = [r["p80_s"] * 1e3 - m for m, (_, r) in zip(med, pts)]
                style = {"roof": "--", "roof_alloc": ":"}.get(provider, "-")
                ax_t.errorbar(
                    xs, med, yerr=[lo, hi], marker="o", ls=style, capsize=2, label=titles[provider]
                )
                ax_g.plot(
                    xs, [r["gbps"] for _, r in pts], marker="o", ls=style, label=titles[provider]
                )
            fixed = ", ".join(
                f"{k}={v}"
                for k, v in (
                    ("B", run["config"]["sweep_b"]),
                    ("D", run["config"]["sweep_d"]),
                    ("Z", run["config"]["sweep_z"]),
                )
                if k != axis
            )
            for ax, ylabel in ((ax_t, "median time (ms)"), (ax_g, "GB/s (ideal bytes / time)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"{op} {MODE_TITLE[mode]} {dtype}, {fixed}", fontsize=9)
            if i == 0 and j == 0:
                ax_t.legend(fontsize=8)
    meta = run["meta"]
    fig.suptitle(
        f"vae_fast ops on {meta['device_name']} (threads={meta['threads']}), "
        f"backend {meta['vae_fast_backend']}",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        B, D, Z = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected BxDxZ, e.g. 8192x784x32"
        ) from None
    return B, D, Z


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(C.DTYPES))
    p.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        help="BxDxZ (batch x data features x latent); default 8192x784x32 4096x12288x128",
    )
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=None, help="default: all")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--providers",
        nargs="+",
        choices=ALL_PROVIDERS,
        default=None,
        help=f"default: {' '.join(DEFAULT_PROVIDERS)} (--quick: without compile)",
    )
    p.add_argument(
        "--vae-backend",
        choices=("auto", "fused", "reference"),
        default="auto",
        help="what the vae_fast provider runs; auto: fused if vae_fast._C is built, "
        "else the reference as a labelled stand-in",
    )
    p.add_argument("--no-sweep", action="store_true", help="only the --sizes")
    p.add_argument("--sweep-ops", nargs="+", choices=list(OPS), default=["elbo_bernoulli"])
    p.add_argument("--sweep-modes", nargs="+", choices=MODES, default=["full"])
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="batch sweep (D, Z fixed); default 256..65536 (CPU), ..262144 (CUDA)",
    )
    p.add_argument(
        "--feature-sizes",
        nargs="+",
        type=int,
        default=None,
        help="feature sweep over D (B, Z fixed); default 64 256 784 3072 12288",
    )
    p.add_argument("--sweep-b", type=int, default=None, help="B of the feature sweep (4096)")
    p.add_argument("--sweep-d", type=int, default=None, help="D of the batch sweep (784)")
    p.add_argument("--sweep-z", type=int, default=None, help="Z of both sweeps (32)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds of timed calls per provider and case (default 1.0)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--threads", type=int, default=None, help="default: every available core")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--append", action="store_true", help="add this run to the --json file")
    p.add_argument("--plot", help="PNG of the sweeps: time and GB/s against size")
    p.add_argument("--markdown", help="write the tables here (they are printed anyway)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and short timings: checks the script, not the kernels",
    )
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    quick = args.quick
    defaults = {
        "sizes": [(256, 784, 32)] if quick else [(8192, 784, 32), (4096, 12288, 128)],
        "ops": list(OPS),
        # torch.compile's cold compiles alone (one per op, pass and shape) take minutes
        "providers": [p for p in DEFAULT_PROVIDERS if p != "compile"]
        if quick
        else list(DEFAULT_PROVIDERS),
        "batch_sizes": [64, 256]
        if quick
        else ([256, 1024, 4096, 16384, 65536, 262144] if cuda else [256, 1024, 4096, 16384, 65536]),
        "feature_sizes": [64, 256] if quick else [64, 256, 784, 3072, 12288],
        "sweep_b": 64 if quick else 4096,
        "sweep_d": 784,
        "sweep_z": 32,
        "min_time": 0.02 if quick else 1.0,
        "rounds": 3 if quick else 5,
        "warmup": 1 if quick else 2,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtypes = [C.DTYPES[d] for d in args.dtype]
    args.providers = [p for p in ALL_PROVIDERS if p in args.providers]  # a fixed column order
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    C.setup_torch(args.device, args.threads, compile="compile" in args.providers)
    vae_backend, _ = C.resolve_vae_backend(args.vae_backend)
    meta = C.machine_meta(args.device, vae_backend)
    C.warn_if_busy(meta)
    compiled = (
        {name: torch.compile(op.eager, dynamic=False) for name, op in OPS.items()}
        if "compile" in args.providers
        else {}
    )
    cases = build_cases(args)
    records: list[dict] = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        recs = run_case(case, args, args.providers, compiled, vae_backend)
        records += recs
        mine = next((r for r in recs if r["provider"] == "vae_fast"), {})
        summary = " ".join(
            f"{r['provider']}={C.fmt_ms(r['median_s'])}ms"
            if "median_s" in r
            else f"{r['provider']}=ERROR({r['error']})"
            for r in recs
        )
        frac = mine.get("frac_roof")
        print(
            f"[{i}/{len(cases)}] {case.op.name} {MODE_TITLE[case.mode]} {case.size} "
            f"{str(case.dtype).split('.')[1]}: {summary}"
            + (f" | vae_fast {100 * frac:.0f}% of roof" if frac else "")
            + f" ({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    C.finish_meta(meta, started)
    config = {
        k: v
        for k, v in vars(args).items()
        if k not in ("dtypes", "json", "plot", "markdown", "append")
    }
    config["sizes"] = ["x".join(map(str, s)) for s in args.sizes]
    run = {
        "kind": "ops",
        "meta": meta,
        "config": config,
        "bytes_formulas": {name: op.bytes_note for name, op in OPS.items()},
        "results": records,
    }
    table = markdown(run)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        C.write_json(args.json, run, args.append)
    if args.plot:
        plot(run, args.plot)
    return run


if __name__ == "__main__":
    main()
