"""The options of the training command: the parser, its argument types and its help
(what each option means, the exit statuses). Parsing only: config.py resolves them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vae_fast._backend import BACKENDS
from vae_fast._validate import ESTIMATORS
from vae_fast.train.config import ACTIVATIONS, BOUNDS, launched_as_rank_0

# Exit statuses (also in --help): 2 is argparse's own for a usage error.
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130
EPILOG = (
    "exit status: 0 done (or stopped by --stop-after); 1 the training diverged (the loss or "
    "the weights became nan/inf; checkpoint.pt keeps the last epoch it saved); 2 a bad option "
    "or bad data (a one-line error); 130 interrupted (Ctrl-C; --resume continues from the "
    "last checkpoint)"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block): every
    mistake, argparse's or ours, reads the same and scripts can grep it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # Under torchrun every rank parses the same options: one of them says so.
        text = f"{self.prog}: error: {' '.join(message.split())}\n"
        self.exit(EXIT_USAGE, text if launched_as_rank_0() else None)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _number(kind: type, *, zero: bool = False, below: int | None = None) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` (int or float) that must be positive, or >= 0
    when `zero` is allowed, and less than `below` if given."""
    rule = ">= 0" if zero else "positive"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = value >= 0 if zero else value > 0
        if not ok or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {rule} and finite, got {text!r}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be less than {below}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and False (their help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vae-fast-train",
        epilog=EPILOG,
        description=(
            "Train a VAE with vae_fast's fused loss ops and report the test ELBO and the "
            "importance-weighted test log-likelihood (nats per example). Run it under "
            "`torchrun --nproc_per_node=N -m vae_fast.train ...` for DistributedDataParallel "
            "(gloo on CPU, NCCL on GPU); --batch-size stays the global batch."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's 8x8 handwritten digits, split 80/20 with a fixed seed), "
        "'synthetic:NxD' (N random rows of D features, for throughput runs), a .npz "
        "(x_train/x_test, train/test, or one array) or .npy file, an IDX file (MNIST's "
        "format, .gz allowed; the t10k-* file next to a train-* file is its test set), or a "
        "directory of IDX files. A single array is split 80/20 with a fixed seed. Rows are "
        "(N, D), (N, H, W) or (N, C, H, W) (or channels-last (N, H, W, C) with 1, 3 or 4 "
        "channels and H > 4). Numbers are read by dtype: floats as they are, "
        "bool as 0/1, uint8 divided by 255; other integer dtypes need --data-scale",
    )
    g.add_argument(
        "--data-scale",
        type=_number(float),
        default=None,
        metavar="S",
        help="divide a file's data by S, whatever its dtype (e.g. 16 for grey levels 0..16 "
        "in an int64 array, or 1e30 for values too large to standardize in float32)",
    )
    g.add_argument(
        "--likelihood",
        choices=("auto", "bernoulli", "gaussian"),
        default="auto",
        help="'auto': Bernoulli for data in [0, 1] (dynamically binarized each step; the test "
        "set is binarized once with a fixed seed), Gaussian for other real data "
        "(standardized; losses are reported in nats of the original units)",
    )
    g.add_argument(
        "--workers",
        type=_number(int, zero=True),
        default=0,
        help="DataLoader worker processes (0 loads batches in the main process)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=("mlp", "conv"),
        default="mlp",
        help="MLP encoder/decoder, or strided convolutions for image data",
    )
    g.add_argument("--latent-dim", type=_number(int), default=8, help="size of z")
    g.add_argument(
        "--hidden",
        type=_int_list,
        default="512,256",
        help="MLP layer widths (the decoder mirrors them); with --model conv the "
        "first value is the fully connected width",
    )
    g.add_argument(
        "--channels",
        type=_int_list,
        default="32,64",
        help="--model conv: channels of each stride-2 convolution",
    )
    g.add_argument(
        "--activation",
        choices=tuple(ACTIVATIONS),
        default="relu",
        help="nonlinearity between layers",
    )
    g.add_argument(
        "--obs-logvar",
        choices=("fixed", "scalar", "feature"),
        default="feature",
        help="Gaussian likelihood: observation log-variance fixed at 0, or learned "
        "as one scalar or one value per feature",
    )
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--batch-size",
        type=_number(int),
        default=128,
        help="global batch (split evenly across processes and --accumulate steps)",
    )
    g.add_argument(
        "--accumulate",
        type=_number(int),
        default=1,
        help="split each process's batch into this many micro-batches: less memory, and "
        "the same arithmetic as that many times more processes",
    )
    g.add_argument(
        "--epochs",
        type=_number(int),
        default=None,
        help="passes over the training set (default: 300 on digits, 20 otherwise)",
    )
    g.add_argument(
        "--steps",
        type=_number(int),
        default=None,
        help="total optimizer steps (overrides --epochs; the last epoch is cut short)",
    )
    g.add_argument(
        "--lr",
        type=_number(float),
        default=3e-3,
        help="Adam learning rate for a batch of --lr-batch examples",
    )
    g.add_argument(
        "--lr-scaling",
        choices=("linear", "sqrt", "none"),
        default="sqrt",
        help="how the learning rate grows with the batch: lr * (batch / lr-batch) "
        "(Goyal et al.'s rule for SGD), its square root (the rule for Adam, Malladi et al. "
        "2022; linear scaling takes Adam to lr ~0.1 at batch 4096, which is unstable), or "
        "not at all",
    )
    g.add_argument(
        "--lr-batch", type=_number(int), default=128, help="the batch size that --lr is meant for"
    )
    g.add_argument(
        "--warmup-steps",
        type=_number(int, zero=True),
        default=None,
        help="linear learning-rate warm-up steps (default: a quarter of the steps, at "
        "most 200); a cosine decay to zero follows",
    )
    g.add_argument(
        "--weight-decay", type=_number(float, zero=True), default=0.0, help="AdamW weight decay"
    )
    g.add_argument(
        "--beta",
        type=_number(float, zero=True),
        default=1.0,
        help="weight of the KL term (1 is the ELBO)",
    )
    g.add_argument(
        "--inplace-grad",
        action="store_true",
        help="write the loss's gradient over the decoder output instead of a fresh "
        "batch-sized tensor (vae_fast.elbo(inplace_grad=True)); saves memory and, on "
        "CPU, page faults at large batches",
    )
    g.add_argument(
        "--bound",
        choices=BOUNDS,
        default="elbo",
        help="the objective: 'elbo' (the evidence lower bound, analytic KL) or 'iwae' (the "
        "importance-weighted bound of --num-samples samples, Burda et al. 2016; "
        "vae_fast.iwae)",
    )
    g.add_argument(
        "--num-samples",
        type=_number(int),
        default=1,
        metavar="K",
        help="samples of z per example: with --bound iwae the K of the bound; with --bound "
        "elbo the multi-sample ELBO (the reconstruction term averaged over K samples, the "
        "analytic KL once)",
    )
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=None,
        help="the gradient estimator of --bound iwae: 'iwae' (the bound's gradient, the "
        "default), 'stl' (sticking the landing) or 'dreg' (doubly reparameterized)",
    )
    g.add_argument(
        "--kl-warmup-steps",
        type=_number(int, zero=True),
        default=None,
        help="ramp the KL weight linearly from 0 to --beta over this many steps, "
        "which keeps the posterior from collapsing early (default: 1500, at most "
        "half the steps)",
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="fused",
        help="vae_fast's compiled kernels, or its plain-torch reference",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="'auto' picks CUDA when available",
    )
    g.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast the networks (the losses stay float32); fp16 needs CUDA "
        "and uses a gradient scaler",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    g.add_argument(
        "--seed",
        type=_number(int, zero=True, below=2**31),  # numpy's seeds (+ rank) are < 2**32
        default=0,
        help="seed of the initialization, data order and noise",
    )
    g.add_argument(
        "--threads",
        type=_number(int),
        default=None,
        help="CPU threads per process (default: 1 when a batch holds at most 2^16 values, "
        "as on digits, where more threads gain little and stall badly on a busy machine; "
        "else torch's choice)",
    )
    g = p.add_argument_group("output and evaluation")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/<data>-<time>) for metrics.jsonl, "
        "samples.png, reconstructions.png and checkpoint.pt",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out's checkpoint; reaches the same result as an uninterrupted run",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one (without it, that is refused)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_number(int),
        default=10,
        help="write the checkpoint every this many epochs (and at the end)",
    )
    g.add_argument(
        "--stop-after",
        type=_number(int),
        default=None,
        metavar="EPOCHS",
        help="stop (with a checkpoint) once this many epochs are done, e.g. to fit "
        "a job's time limit; --resume continues",
    )
    g.add_argument(
        "--eval-samples",
        type=_number(int, zero=True),
        default=1000,
        help="importance samples k for the final test log-likelihood (0 skips it)",
    )
    g.add_argument(
        "--log-every",
        type=_number(int),
        default=None,
        help="print every this many epochs' metrics (default: about 10 lines a run)",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a tqdm progress bar",
    )
    return p
