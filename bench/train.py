"""Samples per second of a whole VAE training step, fused loss against the reference.

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
over the step's time; this says where a faster loss can matter at all.

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (after the path set-up, so `python bench/train.py` works)

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


def run_config(kind: str, batch: int, args, vae_backend: str) -> list[dict]:
    device, dtype = args.device, C.DTYPES[args.dtype]
    torch.manual_seed(0)
    model, row = make_model(kind, args)
    model = model.to(device=device, dtype=dtype)
    x = (torch.rand(batch, *row, device=device) < 0.5).to(dtype)  # binarized, resident
    variants: dict[str, Variant] = {}
    errors: dict[str, str] = {}
    for backend in args.backends:
        for mode in args.modes:
            name = f"{backend}/{mode}"
            try:
                variants[name] = Variant(model, backend, mode, vae_backend, x)
            except Exception as error:  # noqa: BLE001 - report and go on with the others
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    measure = dict(device=device, min_time=args.min_time, rounds=args.rounds, warmup=args.warmup)
    steps = C.measure_interleaved({n: v.step for n, v in variants.items()}, **measure)
    losses = C.measure_interleaved({n: v.loss_step for n, v in variants.items()}, **measure)
    records = []
    for name in [*variants, *errors]:
        backend, mode = name.split("/")
        rec = {
            "model": kind,
            "batch": batch,
            "backend": backend,
            "mode": mode,
            "dtype": args.dtype,
            "device": device,
        }
        timing = steps.get(name, {"error": errors.get(name)})
        rec.update(timing)
        if "median_s" in timing:
            rec["samples_per_s"] = batch / timing["median_s"]
            loss = losses.get(name, {})
            if "median_s" in loss:
                rec["loss_median_s"] = loss["median_s"]
                rec["loss_fraction"] = loss["median_s"] / timing["median_s"]
            else:
                rec["loss_error"] = loss.get("error")
        records.append(rec)
    by_name = {f"{r['backend']}/{r['mode']}": r for r in records}
    for mode in args.modes:
        fused, ref = by_name.get(f"fused/{mode}"), by_name.get(f"reference/{mode}")
        if fused and ref and "median_s" in fused and "median_s" in ref:
            fused["speedup_vs_reference"] = ref["median_s"] / fused["median_s"]
    return records


def markdown(run: dict) -> str:
    meta, records = run["meta"], run["results"]
    args = run["config"]
    fused_title = "fused" if meta["vae_fast_backend"] == "fused" else "fused [reference stand-in]"
    out = [f"Machine: {C.machine_line(meta)}", ""]
    if meta["vae_fast_backend"] != "fused":
        out += [
            "**vae_fast._C was not built: the fused columns ran the reference backend as a "
            "stand-in. These numbers say nothing about the fused kernels.**",
            "",
        ]
    header = ["model", "batch"]
    for mode in args["modes"]:
        header += [
            f"{fused_title} {mode} samples/s",
            f"reference {mode} samples/s",
            f"{mode}: fused / reference",
            f"{mode}: loss share fused / ref",
        ]
    rows = []
    for kind, batch in dict.fromkeys((r["model"], r["batch"]) for r in records):
        row = [kind, str(batch)]
        for mode in args["modes"]:
            get = {
                r["backend"]: r
                for r in records
                if r["model"] == kind and r["batch"] == batch and r["mode"] == mode
            }
            f, r = get.get("fused", {}), get.get("reference", {})
            row += [
                _rate(f),
                _rate(r),
                C.fmt_ratio(f.get("speedup_vs_reference")),
                f"{_pct(f.get('loss_fraction'))} / {_pct(r.get('loss_fraction'))}",
            ]
        rows.append(row)
    out += ["### Training step (forward, loss, backward, Adam)", "", C.md_table(header, rows), ""]
    ratios = [r for r in records if "speedup_vs_reference" in r]
    if ratios:
        slower = [r for r in ratios if r["speedup_vs_reference"] < 1]
        text = "; ".join(
            f"{r['model']} B={r['batch']} {r['mode']} {r['speedup_vs_reference']:.2f}×"
            for r in slower
        )
        out += [
            "Target of issue 5, a step with the fused loss at least as fast as the reference "
            f"everywhere ({len(ratios)} cases): "
            + ("met" if not slower else f"**not met** at {text}"),
            "",
        ]
    return "\n".join(out)


def _rate(rec: dict) -> str:
    if "samples_per_s" in rec:
        return f"{rec['samples_per_s']:,.0f}"
    return "error" if rec.get("error") else "–"


def _pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.0f}%"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default="float32")
    p.add_argument("--models", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"])
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="MLP VAE batches (default 256 1024 4096 16384)",
    )
    p.add_argument(
        "--conv-batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="ConvVAE batches (default 256 1024)",
    )
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=None,
        help="default: eager compile (--quick: eager)",
    )
    p.add_argument(
        "--vae-backend",
        choices=("auto", "fused", "reference"),
        default="auto",
        help="what the 'fused' variants run; auto: the kernels if vae_fast._C is "
        "built, else the reference as a labelled stand-in",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds of timed steps per variant and config (default 2.0)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="default: every available core")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--append", action="store_true", help="add this run to the --json file")
    p.add_argument("--markdown", help="write the table here (it is printed anyway)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny batches, eager only, short timings: checks the script",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "batch_sizes": [32] if quick else [256, 1024, 4096, 16384],
        "conv_batch_sizes": [16] if quick else [256, 1024],
        "modes": ["eager"] if quick else list(MODES),
        "min_time": 0.05 if quick else 2.0,
        "rounds": 3 if quick else 5,
        "warmup": 1 if quick else 3,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    C.setup_torch(args.device, args.threads, compile="compile" in args.modes)
    vae_backend, _ = C.resolve_vae_backend(args.vae_backend)
    meta = C.machine_meta(args.device, vae_backend)
    C.warn_if_busy(meta)
    configs = [("mlp", b) for b in args.batch_sizes if "mlp" in args.models]
    configs += [("conv", b) for b in args.conv_batch_sizes if "conv" in args.models]
    records: list[dict] = []
    for i, (kind, batch) in enumerate(configs, 1):
        t0 = time.perf_counter()
        recs = run_config(kind, batch, args, vae_backend)
        records += recs
        summary = " ".join(
            f"{r['backend']}/{r['mode']}={r['samples_per_s']:,.0f}/s"
            f" (loss {_pct(r.get('loss_fraction'))})"
            if "samples_per_s" in r
            else f"{r['backend']}/{r['mode']}=ERROR({r.get('error')})"
            for r in recs
        )
        print(
            f"[{i}/{len(configs)}] {kind} B={batch}: {summary} ({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    C.finish_meta(meta, started)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "append")}
    run = {"kind": "train", "meta": meta, "config": config, "results": records}
    table = markdown(run)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        C.write_json(args.json, run, args.append)
    return run


if __name__ == "__main__":
    main()
