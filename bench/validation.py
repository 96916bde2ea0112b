"""What checking Bernoulli targets costs: elbo with validate_args on and off.

The check is made in the kernel's own pass over x (a running min and max), so the
two should time the same. Both variants are timed interleaved, round after round,
forward+backward, and the median ratio is printed with its spread.

    python bench/validation.py                       # CPU, float32
    python bench/validation.py --sizes 8192x784x32 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (after the path set-up, so `python bench/validation.py` works)

import vae_fast  # noqa: E402


def _step(recon, x, mu, logvar, validate: bool) -> None:
    for t in (recon, mu, logvar):
        t.grad = None  # into fresh .grad, as a training step does: no accumulation pass
    loss = vae_fast.elbo(recon, x, mu, logvar, validate_args=validate)[0]
    loss.backward()


def _time(fn, min_time: float) -> float:
    """Median seconds per call over calls filling about `min_time`."""
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x784x32", "8192x784x32"])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per variant and round")
    args = _cli.parse_with_threads(parser)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"capability {vae_fast._C.cpu_capability()}"
    )
    print(
        "| B×D×Z | checked ms | unchecked ms | checked / unchecked (median, min–max over rounds) |"
    )
    print("|---|---|---|---|")
    for size in args.sizes:
        B, D, Z = (int(v) for v in size.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(B, D, generator=g).round()
        recon = torch.randn(B, D, generator=g, requires_grad=True)
        mu = torch.randn(B, Z, generator=g, requires_grad=True)
        logvar = torch.randn(B, Z, generator=g, requires_grad=True)
        inputs = (recon, x, mu, logvar)
        on, off, ratios = [], [], []
        for _ in range(args.rounds):
            t_on = _time(lambda: _step(*inputs, True), args.min_time)  # noqa: B023 (called here)
            t_off = _time(lambda: _step(*inputs, False), args.min_time)  # noqa: B023
            on.append(t_on)
            off.append(t_off)
            ratios.append(t_on / t_off)
        print(
            f"| {B}×{D}×{Z} | {statistics.median(on) * 1e3:.3f} | "
            f"{statistics.median(off) * 1e3:.3f} | {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}–{max(ratios):.3f}) |"
        )


if __name__ == "__main__":
    main()
