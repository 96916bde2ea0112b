"""Where the time of a small elbo call goes: the fixed costs around the kernel.

At 128×784 a fused elbo forward+backward is a few tens of µs of kernel inside a call
several times as long. Each stage below is timed interleaved with the others (median
of individually timed calls, bench/_common.py), float32, Bernoulli, into fresh .grad:

- ``kernel``: torch.ops.vae_fast.elbo under no_grad, gradients computed (the C++ op:
  checks, allocation, the fused pass);
- ``engine``: torch's autograd engine on a one-node graph (a view of a 0-d leaf),
  forward+backward: the least any backward costs;
- ``Function``: a Python autograd.Function with no kernel that hands back three
  preallocated gradients of the problem's shapes, forward+backward;
- ``op``: torch.ops.vae_fast.elbo forward+backward through its registered autograd
  (no Python argument checks);
- ``vae_fast.elbo``: the public function, forward+backward;
- ``eager``: pytorch/examples' loss (binary_cross_entropy_with_logits + KL), forward+backward.

    python bench/overhead.py                       # 128x784x32
    python bench/overhead.py --size 1024x784x32 --rounds 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
import _common as C  # noqa: E402  (after the path set-up, so `python bench/overhead.py` works)

import vae_fast  # noqa: E402


class _HandBack(torch.autograd.Function):
    """No kernel: the backward returns gradients made beforehand (which autograd copies
    into fresh .grad, as they stay referenced: a cost the fused op's backward avoids)."""

    @staticmethod
    def forward(ctx, recon, mu, logvar, grads):
        ctx.grads = grads
        return recon.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return (*ctx.grads, None)


def stages(batch: int, features: int, latent: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, features, generator=g).round()
    recon = torch.randn(batch, features, generator=g, requires_grad=True)
    mu = torch.randn(batch, latent, generator=g, requires_grad=True)
    logvar = torch.randn(batch, latent, generator=g, requires_grad=True)
    leaves = (recon, mu, logvar)
    beta = torch.tensor(1.0, dtype=torch.float64)
    scalar = torch.zeros((), requires_grad=True)
    op = torch.ops.vae_fast.elbo

    def fresh(fn):
        def call():
            for t in (*leaves, scalar):
                t.grad = None
            fn()

        return call

    def kernel():
        with torch.no_grad():
            op(x, recon, mu, logvar, None, "bernoulli", beta, "mean", True)

    ready = tuple(torch.empty_like(t) for t in leaves)  # made once, outside the timing

    def handed_back():
        _HandBack.apply(*leaves, ready).backward()

    def eager():
        bce = F.binary_cross_entropy_with_logits(recon, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        ((bce + kld) / batch).backward()

    return {
        "kernel": fresh(kernel),
        "engine": fresh(lambda: scalar.view(()).backward()),
        "Function": fresh(handed_back),
        "op": fresh(lambda: op(x, *leaves, None, "bernoulli", beta, "mean", True)[0].backward()),
        "vae_fast.elbo": fresh(lambda: vae_fast.elbo(recon, x, mu, logvar)[0].backward()),
        "eager": fresh(eager),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128x784x32", help="BxDxZ (default: 128x784x32)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds per stage")
    args = _cli.parse_with_threads(parser)
    batch, features, latent = (int(v) for v in args.size.split("x"))
    times = C.measure_interleaved(
        stages(batch, features, latent),
        device="cpu",
        min_time=args.min_time,
        rounds=args.rounds,
        warmup=50,
    )
    print(
        f"elbo (Bernoulli) {batch}×{features}×{latent} float32, forward+backward, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"capability {vae_fast._C.cpu_capability()}"
    )
    eager = times["eager"]["median_s"]
    print("| stage | median µs (p20–p80) | eager / stage |")
    print("|---|---|---|")
    for name, t in times.items():
        print(
            f"| {name} | {t['median_s'] * 1e6:.1f} ({t['p20_s'] * 1e6:.1f}–"
            f"{t['p80_s'] * 1e6:.1f}) | {eager / t['median_s']:.2f}× |"
        )


if __name__ == "__main__":
    main()
