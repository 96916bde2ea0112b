"""vae_fast.iwae forward+backward against plain torch that repeats x K times, the way
VAE libraries write the importance-weighted bound (pythae's IWAE: ``x.repeat``, an
elementwise BCE, a latent term, logsumexp), in one interleaved run.

Providers, each timed for ``loss`` and ``torch.autograd.grad(loss, [recon, mu, logvar])``
from a decoder output ``recon`` (K, B, D) and ``z = mu + sigma*eps`` built in the call:

- ``vae_fast``: vae_fast.iwae (estimator "iwae"), one pass over recon;
- ``vae_fast dreg``: z from vae_fast.iwae_sample, estimator "dreg" (the same op plus the
  sampler's reweighting);
- ``torch (repeat x)``: plain torch with x repeated K times in memory, as pythae does;
- ``torch (expand x)``: vae_fast's plain-torch reference, x broadcast as a view.

Peak extra memory is the most bytes live at once during one call, from the torch
profiler's allocation records (which also see vae_fast's own huge-page allocations),
beside the size of recon: for the whole call, and for vae_fast.iwae alone (z a leaf,
so that the caller's z = mu + sigma*eps and its backward are left out). Timing follows
bench/_common.py (warm-up, interleaved rounds, median with the 20th/80th percentiles).

    python bench/iwae.py                    # B x D = 1024 x 784, Z = 32, K = 1, 5, 50
    python bench/iwae.py --quick            # small sizes, seconds
    python bench/iwae.py --json bench/results/iwae_cpu.json --markdown bench/results/iwae_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
import _common as C  # noqa: E402  (after the path set-up, so `python bench/iwae.py` works)

import vae_fast  # noqa: E402
from vae_fast.iwae import reference_iwae  # noqa: E402

BASELINE = "torch (repeat x)"


def pythae_iwae_loss(recon, x, z, mu, logvar):
    """The bound as VAE libraries write it: x repeated K times, then elementwise terms."""
    k = recon.shape[0]
    x_rep = x.repeat(k, *([1] * x.dim()))
    ll = -F.binary_cross_entropy_with_logits(recon, x_rep, reduction="none").sum(-1)
    log_q = (-0.5 * (logvar + (z - mu).pow(2) / torch.exp(logvar))).sum(-1)
    log_p = (-0.5 * z.pow(2)).sum(-1)
    log_w = ll + log_p - log_q
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def providers(recon, x, mu, logvar, eps):
    k = recon.shape[0]
    wrt = [recon, mu, logvar]

    def z_of():
        return mu + torch.exp(0.5 * logvar) * eps

    def fused():
        z = z_of()
        loss, _ = vae_fast.iwae(recon, x, z, mu, logvar)
        return loss, torch.autograd.grad(loss, wrt)

    def fused_dreg():
        z = vae_fast.iwae_sample(mu, logvar, k)
        loss, _ = vae_fast.iwae(recon, x, z, mu, logvar, estimator="dreg")
        return loss, torch.autograd.grad(loss, wrt)

    def repeat():
        loss = pythae_iwae_loss(recon, x, z_of(), mu, logvar)
        return loss, torch.autograd.grad(loss, wrt)

    def expand():
        z = z_of()
        loss, _ = reference_iwae(recon, x, z, mu, logvar, validate_args=False)
        return loss, torch.autograd.grad(loss, wrt)

    return {
        "vae_fast": fused,
        "vae_fast dreg": fused_dreg,
        BASELINE: repeat,
        "torch (expand x)": expand,
    }


def op_alone(recon, x, mu, logvar, eps):
    """vae_fast.iwae by itself: z a leaf, its gradient taken with the others'."""
    z = (mu + torch.exp(0.5 * logvar) * eps).detach().requires_grad_()
    wrt = [recon, z, mu, logvar]

    def call():
        loss, _ = vae_fast.iwae(recon, x, z, mu, logvar)
        return loss, torch.autograd.grad(loss, wrt)

    return call


def check_agreement(fns) -> float:
    """Largest relative difference of vae_fast's loss and recon gradient from plain torch's."""
    loss_a, (g_a, *_) = fns["vae_fast"]()
    loss_b, (g_b, *_) = fns[BASELINE]()
    rel_loss = float((loss_a - loss_b).abs() / loss_b.abs())
    rel_grad = float((g_a - g_b).abs().max() / g_b.abs().max())
    return max(rel_loss, rel_grad)


def run(args) -> list[dict]:
    torch.manual_seed(0)
    b, d, z_dim = args.batch, args.features, args.latent
    x = (torch.rand(b, d) < 0.5).float()
    mu = torch.randn(b, z_dim).mul_(0.5).requires_grad_()
    logvar = torch.randn(b, z_dim).mul_(0.1).sub_(1.0).requires_grad_()
    rows = []
    for k in args.samples:
        recon = torch.randn(k, b, d).mul_(2.0).requires_grad_()
        eps = torch.randn(k, b, z_dim)
        fns = providers(recon, x, mu, logvar, eps)
        agreement = check_agreement(fns)
        times = C.measure_interleaved(
            fns, device="cpu", min_time=args.min_time, rounds=args.rounds, warmup=2
        )
        recon_bytes = recon.numel() * recon.element_size()
        alone = C.peak_extra_memory(op_alone(recon, x, mu, logvar, eps), "cpu")
        for name, fn in fns.items():
            memory = C.peak_extra_memory(fn, "cpu")
            rows.append(
                {
                    "K": k,
                    "provider": name,
                    "time": times[name],
                    "peak_bytes": memory["peak_bytes"],
                    "op_alone_peak_bytes": alone["peak_bytes"] if name == "vae_fast" else None,
                    "recon_bytes": recon_bytes,
                    "max_rel_diff_vs_torch": agreement,
                }
            )
        del recon, eps, fns
    return rows


def _ratio(part: int | None, whole: int) -> str:
    return "–" if part is None else f"{part / whole:.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(rows: list[dict], args) -> str:
    base = {r["K"]: r["time"]["median_s"] for r in rows if r["provider"] == BASELINE}
    lines = [
        f"iwae forward+backward, CPU ({torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}), float32, "
        f"B x D = {args.batch} x {args.features}, Z = {args.latent}, torch {torch.__version__}",
        "",
        "| K | provider | median ms (p20-p80) | speedup vs repeat x | peak extra MB "
        "| peak / recon | op alone: peak / recon |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["time"]
        speed = base[r["K"]] / t["median_s"]
        lines.append(
            f"| {r['K']} | {r['provider']} | {t['median_s'] * 1e3:.2f} "
            f"({t['p20_s'] * 1e3:.2f}-{t['p80_s'] * 1e3:.2f}) | {speed:.2f}x | "
            f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / r['recon_bytes']:.2f} | "
            f"{_ratio(r['op_alone_peak_bytes'], r['recon_bytes'])} |"
        )
    lines += ["", "Targets (vae_fast, estimator iwae):"]
    for r in rows:
        if r["provider"] != "vae_fast":
            continue
        speed = base[r["K"]] / r["time"]["median_s"]
        ratio = r["peak_bytes"] / r["recon_bytes"]
        alone = r["op_alone_peak_bytes"] / r["recon_bytes"]
        speed_note = "" if r["K"] == 1 else f"speed {speed:.1f}x >= 3x: {_met(speed >= 3)}; "
        lines.append(
            f"- K={r['K']}: {speed_note}peak {ratio:.2f} x recon <= 1.2: {_met(ratio <= 1.2)} "
            f"(the op alone: {alone:.2f} x: {_met(alone <= 1.2)})"
        )
    diffs = {r["K"]: r["max_rel_diff_vs_torch"] for r in rows}
    lines.append("")
    lines.append(
        "vae_fast against plain torch (largest relative difference of loss and recon "
        "gradient): " + ", ".join(f"K={k}: {v:.1e}" for k, v in diffs.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per provider")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B x D = 64 x 100, short timing")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = _cli.parse_with_threads(parser)
    if args.quick:
        args.batch, args.features, args.min_time, args.rounds = 64, 100, 0.2, 2
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
        config.update(torch=torch.__version__, threads=torch.get_num_threads())
        args.json.write_text(json.dumps({"config": config, "results": rows}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
