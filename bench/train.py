"""Times a whole VAE training step, vae_fast's fused ops (the loss, and the model's
reparameterize) against the reference backend, and writes samples per second as JSON.

A step is what a training loop does per batch: zero the gradients, run the model
(encoder, reparameterize, decoder), the loss (`vae_fast.nn.ELBOLoss`, the negative
ELBO), backward and an Adam step. Each model and batch size runs in four variants,
timed interleaved in one run:

  fused / reference   vae_fast's fused kernels, or `vae_fast.backend("reference")`
                      (the same model on plain torch ops),
  eager / compile     as written, or forward+loss under torch.compile (compiled in
                      the warm-up; backward through AOTAutograd, the optimizer eager).

Besides samples/s the script reports the fraction of the step spent in the loss:
the loss's own forward+backward, timed alone on tensors of the model's output shapes,
over the step's time; this says where a faster loss can matter at all. bench/report.py
makes the table (printed here too) and a plot from the JSON.

    python bench/train.py                       # CPU, MLP VAE at B = 256..16384, ConvVAE
    python bench/train.py --quick               # tiny sizes, eager only, < 1 minute
    python bench/train.py --device cuda --json bench/results/train_cuda.json

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (after the path set-up, so `python bench/train.py` works)
import _common as C  # noqa: E402
import _session as S  # noqa: E402
import report  # noqa: E402

import vae_fast  # noqa: E402
from vae_fast.nn import VAE, ConvVAE, ELBOLoss  # noqa: E402

BACKENDS = ("fused", "reference")
MODES = ("eager", "compile")


def make_model(kind: str, args) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model and the shape of one data row."""
    if kind == "mlp":
        return VAE(784, args.latent, hidden=(512, 256)), (784,)
    return ConvVAE((1, 28, 28), args.latent, channels=(32, 64), hidden=256), (1, 28, 28)


class Variant:
    """One (backend, mode) of one model: its own copy of the weights and optimizer."""

    def __init__(self, model, backend, mode, vae_backend, x):
        self.backend = vae_backend if backend == "fused" else "reference"
        self.model = copy.deepcopy(model)
        self.loss_fn = ELBOLoss(likelihood="bernoulli", reduction="mean").to(x.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = x
        model_, loss_fn = self.model, self.loss_fn

        def forward_loss(x):
            out = model_(x)
            return loss_fn(out.recon, x, out.mu, out.logvar)[0]

        def loss_only(x, recon, mu, logvar):
            return loss_fn(recon, x, mu, logvar)[0]

        if mode == "compile":
            forward_loss = torch.compile(forward_loss, dynamic=False)
            loss_only = torch.compile(loss_only, dynamic=False)
        self.forward_loss, self.loss_only = forward_loss, loss_only
        # Leaves of the model's output shapes, for timing the loss on its own.
        with torch.no_grad(), vae_fast.backend(self.backend):
            out = self.model(x)
        self.loss_inputs = [t.detach().clone().requires_grad_() for t in out[:3]]

    def step(self) -> None:
        with vae_fast.backend(self.backend):
            self.opt.zero_grad(set_to_none=True)
            loss = self.forward_loss(self.x)
            loss.backward()
            self.opt.step()

    def loss_step(self) -> None:
        for t in self.loss_inputs:
            t.grad = None
        with vae_fast.backend(self.backend):
            self.loss_only(self.x, *self.loss_inputs).backward()


class Which(NamedTuple):
    """One variant of a model and batch size: which loss backend, eager or compiled."""

    backend: str
    mode: str


def run_config(kind: str, batch: int, args, vae_backend: str) -> list[dict]:
    device, dtype = args.device, S.DTYPES[args.dtype]
    torch.manual_seed(0)
    model, row = make_model(kind, args)
    model = model.to(device=device, dtype=dtype)
    x = (torch.rand(batch, *row, device=device) < 0.5).to(dtype)  # binarized, resident
    variants: dict[Which, Variant] = {}
    errors: dict[Which, str] = {}
    for which in (Which(b, m) for b in args.backends for m in args.modes):
        try:
            variants[which] = Variant(model, which.backend, which.mode, vae_backend, x)
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            errors[which] = C.describe_error(error)
    measure = dict(device=device, min_time=args.min_time, rounds=args.rounds, warmup=args.warmup)
    steps = C.measure_interleaved({w: v.step for w, v in variants.items()}, **measure)
    losses = C.measure_interleaved({w: v.loss_step for w, v in variants.items()}, **measure)
    records: dict[Which, dict] = {}
    for which in [*variants, *errors]:
        rec = {"model": kind, "batch": batch, **which._asdict(), "dtype": args.dtype}
        rec["device"] = device
        timing = steps.get(which, {"error": errors.get(which)})
        rec.update(timing)
        if "median_s" in timing:
            rec["samples_per_s"] = batch / timing["median_s"]
            loss = losses.get(which, {})
            if "median_s" in loss:
                rec["loss_median_s"] = loss["median_s"]
                rec["loss_fraction"] = loss["median_s"] / timing["median_s"]
            else:
                rec["loss_error"] = loss.get("error")
        records[which] = rec
    for mode in args.modes:
        fused, ref = records.get(Which("fused", mode)), records.get(Which("reference", mode))
        if fused and ref and "median_s" in fused and "median_s" in ref:
            fused["speedup_vs_reference"] = ref["median_s"] / fused["median_s"]
    return list(records.values())


def parse_args(argv=None) -> argparse.Namespace:
    Later = _cli.Later
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_cli.HelpFormatter
    )
    p.add_argument("--dtype", choices=sorted(S.DTYPES), default="float32", help="of model and data")
    p.add_argument(
        "--models", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"], help="which"
    )
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=Later([256, 1024, 4096, 16384], quick=[32]),
        help="MLP VAE batches",
    )
    p.add_argument(
        "--conv-batch-sizes",
        nargs="+",
        type=int,
        default=Later([256, 1024], quick=[16]),
        help="ConvVAE batches",
    )
    p.add_argument("--latent", type=int, default=32, help="latent size")
    p.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="which losses"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=Later(list(MODES), quick=["eager"]),
        help="as written, or forward and loss under torch.compile",
    )
    _cli.add_run_options(
        p,
        runs="the 'fused' variants run",
        per="variant and configuration",
        quick="tiny batches, eager only, short timings: checks the script",
        min_time=Later(2.0, quick=0.05),
        warmup=Later(3, quick=1),
    )
    return _cli.fill_defaults(p.parse_args(argv))


def main(argv=None) -> dict:
    args = parse_args(argv)
    session = S.Session.begin(args, compile="compile" in args.modes)
    configs = [("mlp", b) for b in args.batch_sizes if "mlp" in args.models]
    configs += [("conv", b) for b in args.conv_batch_sizes if "conv" in args.models]
    records: list[dict] = []
    for i, (kind, batch) in enumerate(configs, 1):
        t0 = time.perf_counter()
        recs = run_config(kind, batch, args, session.vae_backend)
        records += recs
        summary = " ".join(
            f"{r['backend']}/{r['mode']}={r['samples_per_s']:,.0f}/s"
            f" (loss {report.fmt_pct(r.get('loss_fraction'))})"
            if "samples_per_s" in r
            else f"{r['backend']}/{r['mode']}=ERROR({r.get('error')})"
            for r in recs
        )
        print(
            f"[{i}/{len(configs)}] {kind} B={batch}: {summary} ({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    run = session.finish("train", S.options(args), records)
    if args.json:
        S.write_json(args.json, run, args.append)
    report.publish(run, args.markdown)
    return run


if __name__ == "__main__":
    main()
