"""Train a VAE with the fused vae_fast ops: ``python -m vae_fast.train`` (or ``vae-fast-train``).

One process:   python -m vae_fast.train --data digits --out runs/demo
Many:          torchrun --nproc_per_node=4 -m vae_fast.train --data mnist/ --batch-size 4096

Reproducibility: the data order comes from (seed, epoch) and every random draw of a
training step (dynamic binarization, the reparameterization noise) from a generator
seeded with (seed, step, shard), where the global batch is cut into
``world_size * accumulate`` interleaved shards. So a run gives the same numbers on 1
process with ``--accumulate 2`` as on 2 processes, and a ``--resume`` continues exactly
where the uninterrupted run would be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import vae_fast
from vae_fast import _plots
from vae_fast._backend import BACKENDS
from vae_fast.data import DataError, Dataset, DataWarning, load_dataset
from vae_fast.nn import VAE, ConvVAE, ELBOLoss

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Options that define the run: --resume refuses a checkpoint written with other values.
IDENTITY = (
    "data",
    "data_scale",
    "model",
    "latent_dim",
    "hidden",
    "channels",
    "activation",
    "likelihood",
    "obs_logvar",
    "batch_size",
    "epochs",
    "steps",
    "lr",
    "lr_scaling",
    "lr_batch",
    "warmup_steps",
    "beta",
    "kl_warmup_steps",
    "weight_decay",
    "seed",
)
# A batch of at most this many values trains on one thread unless --threads says otherwise.
SMALL_BATCH = 1 << 16
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}
# Exit statuses (also in --help): 2 is argparse's own for a usage error.
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130
EPILOG = (
    "exit status: 0 done (or stopped by --stop-after); 1 the training diverged (the loss or "
    "the weights became nan/inf; checkpoint.pt keeps the last good epoch); 2 a bad option "
    "or bad data (a one-line error); 130 interrupted (Ctrl-C; --resume continues from the "
    "last checkpoint)"
)


class ConfigError(ValueError):
    """A bad combination of options; reported as a one-line command-line error."""


class Diverged(RuntimeError):
    """The loss or the weights became non-finite: the run stops (exit status 1)."""


class _Interrupted(Exception):
    """Ctrl-C during training; the message says where --resume continues."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block): every
    mistake, argparse's or ours, reads the same and scripts can grep it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


# --------------------------------------------------------------------------- arguments


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


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) that must be positive and finite."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind: type) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) that must be >= 0 and finite."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text!r}")
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
        "(N, D), (N, H, W) or (N, C, H, W). Numbers are read by dtype: floats as they are, "
        "bool as 0/1, uint8 divided by 255; other integer dtypes need --data-scale",
    )
    g.add_argument(
        "--data-scale",
        type=_positive(float),
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
        type=_non_negative(int),
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
    g.add_argument("--latent-dim", type=_positive(int), default=8, help="size of z")
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
        type=_positive(int),
        default=128,
        help="global batch (split evenly across processes and --accumulate steps)",
    )
    g.add_argument(
        "--accumulate",
        type=_positive(int),
        default=1,
        help="split each process's batch into this many micro-batches: less memory, and "
        "the same arithmetic as that many times more processes",
    )
    g.add_argument(
        "--epochs",
        type=_positive(int),
        default=None,
        help="passes over the training set (default: 300 on digits, 20 otherwise)",
    )
    g.add_argument(
        "--steps",
        type=_positive(int),
        default=None,
        help="total optimizer steps (overrides --epochs; the last epoch is cut short)",
    )
    g.add_argument(
        "--lr",
        type=_positive(float),
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
        "--lr-batch", type=_positive(int), default=128, help="the batch size that --lr is meant for"
    )
    g.add_argument(
        "--warmup-steps",
        type=_non_negative(int),
        default=None,
        help="linear learning-rate warm-up steps (default: a quarter of the steps, at "
        "most 200); a cosine decay to zero follows",
    )
    g.add_argument(
        "--weight-decay", type=_non_negative(float), default=0.0, help="AdamW weight decay"
    )
    g.add_argument(
        "--beta",
        type=_non_negative(float),
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
        "--kl-warmup-steps",
        type=_non_negative(int),
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
        type=_non_negative(int),
        default=0,
        help="seed of the initialization, data order and noise",
    )
    g.add_argument(
        "--threads",
        type=_positive(int),
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
        "--checkpoint-every",
        type=_positive(int),
        default=10,
        help="write the checkpoint every this many epochs (and at the end)",
    )
    g.add_argument(
        "--stop-after",
        type=_positive(int),
        default=None,
        metavar="EPOCHS",
        help="stop (with a checkpoint) once this many epochs are done, e.g. to fit "
        "a job's time limit; --resume continues",
    )
    g.add_argument(
        "--eval-samples",
        type=_non_negative(int),
        default=1000,
        help="importance samples k for the final test log-likelihood (0 skips it)",
    )
    g.add_argument(
        "--log-every",
        type=_positive(int),
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


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available (use --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device("cpu")


def _start_runtime(args: argparse.Namespace) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(args.device, local_rank)
    if world == 1:
        return Runtime(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


@dataclass
class Prepared:
    """The data as the model sees it, plus how to map results back to the data's units."""

    train: torch.Tensor  # probabilities (Bernoulli) or standardized values (Gaussian)
    test: torch.Tensor  # binarized once (Bernoulli) or standardized (Gaussian)
    test_shown: torch.Tensor  # test rows in data space, for the reconstruction picture
    likelihood: str
    shift: torch.Tensor | float = 0.0
    scale: torch.Tensor | float = 1.0
    log_jacobian: float = 0.0  # sum(log scale): nats per row added to losses in data units


def _prepare(data: Dataset, likelihood: str, label: str | None = None) -> Prepared:
    """The likelihood's view of the data; `label` names the data in errors (--data X)."""
    label = label or data.name
    if likelihood == "auto":
        likelihood = "bernoulli" if data.binary else "gaussian"
    if likelihood == "bernoulli":
        if not data.binary:
            raise ConfigError(
                f"--likelihood bernoulli: {data.name} has values outside [0, 1]; "
                "use --likelihood gaussian"
            )
        # The test set is binarized once, with a fixed seed, so every run is scored alike.
        g = torch.Generator().manual_seed(1)
        test = torch.bernoulli(data.test, generator=g)
        return Prepared(data.train, test, data.test, "bernoulli")
    shift = data.train.mean(0)
    std = data.train.std(0)
    # Constant features would get a zero scale: leave those unscaled.
    scale = torch.where(std > 1e-6 * float(std.max().clamp_min(1e-30)), std, torch.ones_like(std))
    train, test = (data.train - shift) / scale, (data.test - shift) / scale
    # Finite float32 data near float32's limit (say ±3e38) overflows the mean or the
    # standard deviation: the run would train on nan. Refuse it, with the way out.
    if not all(bool(t.isfinite().all()) for t in (shift, scale, train, test)):
        big = max(float(data.train.abs().max()), float(data.test.abs().max()))
        divisor = 10.0 ** math.ceil(math.log10(big)) if big > 0 else 1.0
        raise DataError(
            f"--data {label}: values as large as {big:.3g} overflow float32 when standardized "
            f"for the Gaussian likelihood (the mean or standard deviation is not finite); "
            f"divide them, e.g. with --data-scale {divisor:g}"
        )
    return Prepared(train, test, data.test, "gaussian", shift, scale, float(scale.log().sum()))


def _build_model(args: argparse.Namespace, data: Dataset, likelihood: str) -> nn.Module:
    activation = ACTIVATIONS[args.activation]
    if args.model == "conv":
        if data.image_shape is None:
            raise ConfigError(
                f"--model conv: {data.name} rows of shape {data.event_shape} are not images; "
                "use --model mlp"
            )
        return ConvVAE(
            data.image_shape, args.latent_dim, args.channels, args.hidden[0], likelihood, activation
        )
    return VAE(math.prod(data.event_shape), args.latent_dim, args.hidden, likelihood, activation)


class Objective(nn.Module):
    """Model and loss in one module, so that DDP averages the gradients of both (the
    Gaussian observation log-variance is a parameter of the loss)."""

    def __init__(self, model: nn.Module, loss: ELBOLoss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(x, generator=generator)
        return self.loss(out.recon, x, out.mu, out.logvar)


def _shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of one shard's noise at one step: independent streams, same on any world size."""
    state = np.random.SeedSequence([seed, step, shard]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _Rows(torch.utils.data.Dataset):
    """Rows of one tensor, fetched a whole batch of indices at a time."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: list[int]) -> torch.Tensor:
        return self.x[index]


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int
    beta: float
    kl_warmup_steps: int

    def lr(self, step: int) -> float:
        """Linear warm-up to the peak, then a cosine decay to zero at the last step."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup_steps) / span))

    def kl_weight(self, step: int) -> float:
        if step >= self.kl_warmup_steps:
            return self.beta
        return self.beta * (step + 1) / self.kl_warmup_steps


def _schedule(args: argparse.Namespace, total_steps: int) -> Schedule:
    ratio = args.batch_size / args.lr_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[args.lr_scaling]
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(200, max(1, total_steps // 4))
    kl_warmup = args.kl_warmup_steps
    if kl_warmup is None:
        kl_warmup = min(1500, total_steps // 2)
    return Schedule(args.lr * factor, total_steps, min(warmup, total_steps), args.beta, kl_warmup)


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain data: weights_only
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np_state,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(
        np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32)
    )
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same directory, then rename over `path`: a
    reader (or a run killed mid-write) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _identity(args: argparse.Namespace) -> dict:
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in IDENTITY
    }


# What a checkpoint of format 1 holds (see _save_checkpoint), with each entry's type.
_CHECKPOINT_ENTRIES = {
    "config": dict,
    "epoch": int,
    "history": list,
    "objective": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": list,
}


def _first_sentence(error: BaseException, limit: int = 100) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_checkpoint(path: Path) -> dict:
    """torch.load `path` and check that it is a checkpoint of this command; anything
    else (truncated, empty, garbage, another program's file) is a one-line ConfigError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError (zip), ...
        why = "the file is empty" if path.stat().st_size == 0 else _first_sentence(error)
        raise ConfigError(
            f"--resume: cannot read {path}: not a readable torch checkpoint, truncated or "
            f"damaged ({why})"
        ) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        what = (
            f"a dict with keys {', '.join(map(repr, list(ckpt)[:5]))}"
            if isinstance(ckpt, dict) and ckpt
            else f"a {type(ckpt).__name__}"
        )
        raise ConfigError(f"--resume: {path} is not a vae-fast-train checkpoint (it holds {what})")
    fmt = ckpt["format"]
    if not (type(fmt) is int and fmt == 1):
        shown = repr(fmt)[:40] if isinstance(fmt, (int, float, str)) else type(fmt).__name__
        raise ConfigError(
            f"--resume: {path} has checkpoint format {shown}; this vae_fast "
            f"{vae_fast.__version__} reads format 1"
        )
    bad = [k for k, kind in _CHECKPOINT_ENTRIES.items() if not isinstance(ckpt.get(k), kind)]
    if bad:
        raise ConfigError(
            f"--resume: {path} is not a complete vae-fast-train checkpoint (missing or bad: "
            f"{', '.join(bad)})"
        )
    return ckpt


def _load_checkpoint(args: argparse.Namespace, rt: Runtime) -> dict:
    """Rank 0 reads the checkpoint and hands it to every rank (no shared disk needed)."""
    box: list = [None]
    if rt.main:
        path, ckpt = args.out / CHECKPOINT, None
        if not path.exists():
            box[0] = ConfigError(f"--resume: no checkpoint at {path}")
        else:
            try:
                ckpt = _read_checkpoint(path)
            except ConfigError as error:
                ckpt, box[0] = None, error
        if ckpt is not None:
            want, have = _identity(args), ckpt["config"]
            diff = [k for k in IDENTITY if want.get(k) != have.get(k)]
            if diff:
                k = diff[0]
                box[0] = ConfigError(
                    f"--resume: {path} was written with --{k.replace('_', '-')} {have.get(k)}, "
                    f"this run has {want.get(k)}; use the same options"
                )
            else:
                box[0] = ckpt
    if rt.distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConfigError):
        raise box[0]
    return box[0]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    objective: Objective, x: torch.Tensor, seed: int, device: torch.device, batch: int = 4096
) -> dict[str, float]:
    """The test negative ELBO (beta = 1) and its two terms, averaged over rows, in nats."""
    g = torch.Generator(device=device).manual_seed(seed)
    total_ll = total_kl = 0.0
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].to(device)
        out = objective.model(xb, generator=g)
        _, ll, kl = objective.loss(out.recon, xb, out.mu, out.logvar)
        total_ll += float(ll.double().sum())
        total_kl += float(kl.double().sum())
    n = x.shape[0]
    return {
        "test_loss": (total_kl - total_ll) / n,
        "test_recon": -total_ll / n,
        "test_kl": total_kl / n,
    }


@torch.no_grad()
def evaluate_log_likelihood(
    objective: Objective,
    x: torch.Tensor,
    k: int,
    seed: int,
    device: torch.device,
    batch: int = 1024,
) -> float:
    """Mean importance-weighted log p(x) over the rows of x (k samples each), in nats."""
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    obs = objective.loss.obs_logvar
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].to(device)
        ll = objective.model.log_likelihood(xb, k, obs_logvar=obs, generator=g)
        total += float(ll.double().sum())
    return total / x.shape[0]


def _pictures(
    objective: Objective, prep: Prepared, data: Dataset, out: Path, seed: int, device: torch.device
) -> tuple[Path, Path]:
    model = objective.model
    image = data.image_shape or (1, 1, math.prod(data.event_shape))
    g = torch.Generator(device=device).manual_seed(seed)

    def to_data(t: torch.Tensor) -> torch.Tensor:
        # An MLP gives flat rows: back to the data's shape before the per-feature
        # shift and scale (of that shape), then to the picture's (C, H, W).
        t = t.float().cpu().reshape(-1, *data.event_shape) * prep.scale + prep.shift
        return t.reshape(-1, *image)

    lo, hi = (
        (0.0, 1.0)
        if prep.likelihood == "bernoulli"
        else (float(data.train.min()), float(data.train.max()))
    )
    ncol = 10 if image[2] <= 64 else 4
    samples = to_data(model.sample(ncol * ncol, generator=g))
    s = _plots.save_grid(
        samples,
        out / "samples.png",
        f"{data.name}: {ncol * ncol} samples (mean of p(x|z), z ~ N(0, I))",
        ncol=ncol,
        vmin=lo,
        vmax=hi,
    )
    n = min(ncol * (ncol // 2), prep.test.shape[0])
    shown = prep.test_shown[:n]
    model_in = shown if prep.likelihood == "bernoulli" else prep.test[:n]
    recon = to_data(model.reconstruct(model_in.to(device)))
    pairs = []
    for r in range(0, n, ncol):  # alternating rows: test images, then their reconstructions
        pairs += [shown[r : r + ncol].reshape(-1, *image), recon[r : r + ncol]]
    r = _plots.save_grid(
        torch.cat(pairs),
        out / "reconstructions.png",
        f"{data.name}: test images (odd rows) and reconstructions (even rows)",
        ncol=ncol,
        vmin=lo,
        vmax=hi,
    )
    return s, r


# --------------------------------------------------------------------------- training


def _batches(loader: DataLoader, limit: int) -> Iterator[torch.Tensor]:
    for i, xb in enumerate(loader):
        if i >= limit:
            return
        yield xb


def _check(args: argparse.Namespace, rt: Runtime, n_train: int) -> None:
    shards = rt.world * args.accumulate
    if args.batch_size % shards:
        raise ConfigError(
            f"--batch-size {args.batch_size} must be divisible by processes x --accumulate "
            f"= {rt.world} x {args.accumulate}"
        )
    if args.batch_size > n_train:
        raise ConfigError(
            f"--batch-size {args.batch_size} exceeds the {n_train} training rows of --data "
            f"{args.data}"
        )
    if args.amp == "fp16" and rt.device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    if args.backend == "fused" and vae_fast.ops._LOAD_ERROR is not None:
        raise ConfigError(
            "--backend fused: vae_fast's compiled extension is not built (`make build`); "
            "use --backend reference"
        )
    if args.resume and args.out is None:
        raise ConfigError("--resume needs the --out DIR of the run to continue")


def _load_data(args: argparse.Namespace, prog: str) -> Dataset:
    """load_dataset, with its DataWarnings printed as one line each on stderr (rank 0)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        data = load_dataset(args.data, scale=args.data_scale)
    for w in caught:
        if not issubclass(w.category, DataWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    return data


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv`, train, and return the final metrics (the last metrics.jsonl record).

    Failures raise SystemExit with a one-line message on stderr and the status of
    EPILOG: 2 for bad options or data, 1 when the training diverges, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        data = _load_data(args, parser.prog)
        prep = _prepare(data, args.likelihood, args.data)
        rt = _start_runtime(args)
    except (DataError, ConfigError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: interrupted\n")
    threads = torch.get_num_threads()
    try:
        if args.threads is None and args.batch_size * math.prod(data.event_shape) <= SMALL_BATCH:
            # Tiny matrix products: a second thread saves little and, when the cores are
            # shared, its synchronization costs several times the work (measured on digits).
            args.threads = 1
        if args.threads:
            torch.set_num_threads(args.threads)
        with vae_fast.backend(args.backend):
            return _train(args, data, prep, rt)
    except (DataError, ConfigError) as error:
        parser.error(str(error))
    except Diverged as error:
        parser.exit(EXIT_DIVERGED, f"{parser.prog}: error: {error}\n" if rt.main else None)
    except _Interrupted as error:
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: {error}\n" if rt.main else None)
    except KeyboardInterrupt:  # before the training loop: building, compiling, resuming
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: interrupted\n" if rt.main else None)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting
        if rt.distributed:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, data: Dataset, prep: Prepared, rt: Runtime) -> dict:
    _check(args, rt, prep.train.shape[0])
    device, world = rt.device, rt.world
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = Path("runs") / f"{data.name}-{stamp}"
    if rt.main:
        args.out.mkdir(parents=True, exist_ok=True)

    # The same initialization on every rank (DDP would broadcast rank 0's anyway).
    torch.manual_seed(args.seed)
    model = _build_model(args, data, prep.likelihood)
    loss_fn = ELBOLoss(
        prep.likelihood,
        args.obs_logvar if prep.likelihood == "gaussian" else "fixed",
        beta=args.beta,
        event_shape=data.event_shape,
        inplace_grad=args.inplace_grad,
    )
    objective = Objective(model, loss_fn).to(device)
    random.seed(args.seed + rt.rank)
    np.random.seed(args.seed + rt.rank)
    torch.manual_seed(args.seed + rt.rank)

    steps_per_epoch = prep.train.shape[0] // args.batch_size
    if args.epochs is None:  # digits is small: it takes many passes (~3300 steps)
        args.epochs = 300 if args.data == "digits" else 20
    total_steps = args.steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    sched = _schedule(args, total_steps)
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=sched.lr(0), weight_decay=args.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, history = 0, []
    if args.resume:
        ckpt = _load_checkpoint(args, rt)
        try:
            objective.load_state_dict(ckpt["objective"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            if len(ckpt["rng"]) == world:
                _set_rng_state(ckpt["rng"][rt.rank])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            raise ConfigError(
                f"--resume: {args.out / CHECKPOINT} does not fit this run's model and "
                f"optimizer ({_first_sentence(error)})"
            ) from None
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        if rt.main:  # drop metrics lines of epochs after the checkpoint
            _write_metrics(args.out / METRICS, history)
    elif rt.main:
        _write_metrics(args.out / METRICS, [])

    if args.compile:
        model.encoder.compile()
        model.decoder.compile()
    trainer: nn.Module = objective
    if rt.distributed:
        trainer = DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    local_batch = args.batch_size // world
    sampler = DistributedSampler(
        _Rows(prep.train),
        num_replicas=world,
        rank=rt.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    loader = DataLoader(
        _Rows(prep.train),
        batch_size=None,
        sampler=BatchSampler(sampler, local_batch, drop_last=True),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
        if args.amp != "none"
        else contextlib.nullcontext()
    )
    noise = torch.Generator(device=device)
    binarize = prep.likelihood == "bernoulli"
    log_every = args.log_every or max(1, math.ceil(epochs / 10))

    if rt.main:
        print(_startup_line(args, data, prep, rt, sched, epochs, start_epoch), flush=True)
    bar = None
    if rt.main and args.progress and start_epoch < epochs:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_epoch * steps_per_epoch,
            unit="step",
            dynamic_ncols=True,
            desc=data.name,
        )
    stop = min(epochs, args.stop_after or epochs)
    step = start_epoch * steps_per_epoch
    saved = start_epoch if args.resume else None  # the epoch that checkpoint.pt holds

    def diverged(what: str) -> Diverged:
        kept = (
            f"{args.out / CHECKPOINT} keeps epoch {saved}, the last good one"
            if saved
            else "this run wrote no checkpoint"
        )
        return Diverged(
            f"{what}: the run diverged (lower --lr, now {args.lr:g}, or raise "
            f"--warmup-steps); {kept}"
        )

    try:
        for epoch in range(start_epoch, stop):
            objective.train()
            sampler.set_epoch(epoch)
            n_steps = min(steps_per_epoch, total_steps - step)
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps
            t0 = time.perf_counter()
            for i, xb in enumerate(_batches(loader, n_steps)):
                lr = sched.lr(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_fn.beta = sched.kl_weight(step)
                sums[0] += _train_step(
                    trainer,
                    xb,
                    step,
                    args=args,
                    rt=rt,
                    noise=noise,
                    binarize=binarize,
                    amp=amp,
                    scaler=scaler,
                    optimizer=optimizer,
                )
                sums[1] += 1
                step += 1
                if bar is not None:
                    bar.update(1)
                # The host reads the loss only every 25 steps (a read waits for the
                # device). One process stops there on a nan; processes of a distributed
                # run check together at the end of the epoch, where they all-reduce.
                if (i % 25 == 0 or i == n_steps - 1) and (bar is not None or not rt.distributed):
                    mean = float(sums[0] / sums[1])
                    if not rt.distributed and not math.isfinite(mean):
                        raise diverged(f"the training loss became {mean} by step {step}")
                    if bar is not None:
                        postfix = {"epoch": epoch + 1, "loss": f"{mean:.3f}"}
                        if loss_fn.beta < sched.beta:  # KL warm-up: why the loss may rise
                            postfix["beta"] = f"{loss_fn.beta:.3g}"
                        rate = (i + 1) * args.batch_size / (time.perf_counter() - t0)
                        postfix["samples_s"] = f"{rate:,.0f}"
                        bar.set_postfix(postfix, refresh=False)
            if rt.distributed:
                dist.all_reduce(sums)
            train_loss = float(sums[0] / sums[1])
            # Every process has the same reduced loss and the same weights: they agree.
            if not math.isfinite(train_loss):
                raise diverged(f"the training loss became {train_loss} in epoch {epoch + 1}")
            if not _finite_weights(objective):
                raise diverged(f"the weights became nan or inf in epoch {epoch + 1}")
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": train_loss + prep.log_jacobian,
                "samples_per_s": n_steps * args.batch_size / seconds,
                "epoch_time_s": seconds,
                "lr": lr,
                "beta": loss_fn.beta,
            }
            final = epoch + 1 == epochs
            checkpoint = final or epoch + 1 == stop or (epoch + 1) % args.checkpoint_every == 0
            rng = _gather_rng(rt) if checkpoint else None
            if rt.main:
                objective.eval()
                test = evaluate(objective, prep.test, args.seed, device)
                test["test_loss"] += prep.log_jacobian
                record.update(test)
                if final and args.eval_samples:
                    t1 = time.perf_counter()
                    record["test_log_likelihood"] = (
                        evaluate_log_likelihood(
                            objective, prep.test, args.eval_samples, args.seed, device
                        )
                        - prep.log_jacobian
                    )
                    record["log_likelihood_samples"] = args.eval_samples
                    record["log_likelihood_time_s"] = time.perf_counter() - t1
                history.append(record)
                _append_metrics(args.out / METRICS, record)
                if (epoch + 1) % log_every == 0 or final or epoch + 1 == stop:
                    (bar.write if bar is not None else print)(_json_line(record, 4))
                if checkpoint:
                    _save_checkpoint(args, objective, optimizer, scaler, epoch + 1, history, rng)
            if checkpoint:
                saved = epoch + 1
        if bar is not None:
            bar.close()

        result = history[-1] if history else {}
        if rt.main and stop == epochs:
            objective.eval()
            samples, recons = _pictures(objective, prep, data, args.out, args.seed, device)
            _summary(args, result, samples, recons)
        elif rt.main:
            print(
                f"stopped after epoch {stop} of {epochs}; continue with --resume --out {args.out}"
            )
        return result
    except KeyboardInterrupt:
        raise _Interrupted(
            f"interrupted; `--resume` continues from epoch {saved}"
            if saved
            else "interrupted before the first checkpoint; nothing to resume (start again)"
        ) from None
    finally:
        if bar is not None:
            bar.close()


def _finite_weights(module: nn.Module) -> bool:
    """Whether every parameter of `module` is finite (one host read for all of them)."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _startup_line(
    args: argparse.Namespace,
    data: Dataset,
    prep: Prepared,
    rt: Runtime,
    sched: Schedule,
    epochs: int,
    start_epoch: int,
) -> str:
    """One line with what the run chose: data, likelihood, model, device, threads, batch,
    learning rate, length (the defaults and 'auto' choices included)."""
    shape = "x".join(map(str, data.event_shape))
    reading = f", {data.reading}" if data.reading else ""
    why = "values in [0, 1]" if prep.likelihood == "bernoulli" else "real values, standardized"
    likelihood = prep.likelihood + (f" (auto: {why})" if args.likelihood == "auto" else "")
    if args.model == "conv":
        model = f"conv channels {','.join(map(str, args.channels))} fc {args.hidden[0]}"
    else:
        model = f"mlp hidden {','.join(map(str, args.hidden))}"
    device = str(rt.device) + (f" x {rt.world} processes" if rt.distributed else "")
    threads = torch.get_num_threads()
    lr = f"{sched.peak_lr:.3g}"
    if not math.isclose(sched.peak_lr, args.lr):
        lr += f" (--lr {args.lr:g} at batch {args.lr_batch}, {args.lr_scaling} scaling)"
    length = f"{epochs} epochs ({sched.total_steps} steps)"
    if sched.kl_warmup_steps:
        length += f", KL weight 0 -> {args.beta:g} over {sched.kl_warmup_steps} steps"
    if start_epoch:
        length += f", resuming after epoch {start_epoch}"
    return (
        f"data {args.data} ({data.train.shape[0]} train + {data.test.shape[0]} test rows of "
        f"{shape}{reading}); likelihood {likelihood}; model {model} latent {args.latent_dim}; "
        f"device {device}; {threads} thread{'s' if threads > 1 else ''}; batch "
        f"{args.batch_size}; lr {lr}; {length}; out {args.out}"
    )


def _train_step(
    trainer: nn.Module,
    xb: torch.Tensor,
    step: int,
    *,
    args: argparse.Namespace,
    rt: Runtime,
    noise: torch.Generator,
    binarize: bool,
    amp: contextlib.AbstractContextManager,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """One optimizer step on this rank's rows `xb` of the global batch; returns the loss
    (a float64 tensor, so that logging does not wait for the device).

    The rows are cut into --accumulate interleaved micro-batches. Shard `rank + world * a`
    of step `step` draws its binarization and reparameterization noise from its own seed,
    so every (world, accumulate) split of the same global batch does the same arithmetic.
    """
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    for a in range(args.accumulate):
        micro = xb[a :: args.accumulate].to(rt.device, non_blocking=True)
        noise.manual_seed(_shard_seed(args.seed, step, rt.rank + rt.world * a))
        if binarize:  # dynamic binarization: a fresh draw of the pixels every step
            micro = torch.bernoulli(micro, generator=noise)
        last = a == args.accumulate - 1
        # DDP all-reduces the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if last or not rt.distributed else trainer.no_sync()
        with sync:
            with amp:
                loss, _, _ = trainer(micro, noise)
            scaler.scale(loss / args.accumulate).backward()
        total += loss.detach().double() / args.accumulate
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def _gather_rng(rt: Runtime) -> list[dict]:
    state = _rng_state()
    if not rt.distributed:
        return [state]
    states: list = [None] * rt.world
    dist.all_gather_object(states, state)
    return states


def _save_checkpoint(
    args: argparse.Namespace,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    history: list[dict],
    rng: list[dict],
) -> None:
    """Everything --resume needs, written atomically to --out/checkpoint.pt (rank 0)."""
    ckpt = {
        "format": 1,
        "config": _identity(args),
        "epoch": epoch,
        "history": history,
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "vae_fast": vae_fast.__version__,
    }
    _atomic_write(args.out / CHECKPOINT, lambda f: torch.save(ckpt, f))


def _json_line(record: dict, digits: int | None = None) -> str:
    """`record` as strict JSON: nan and inf (which json.dumps would write as the bare
    tokens NaN/Infinity that strict readers refuse) become null; floats rounded to
    `digits` when given."""

    def value(v: Any) -> Any:
        if isinstance(v, float):
            if not math.isfinite(v):
                return None
            return round(v, digits) if digits is not None else v
        return v

    return json.dumps({k: value(v) for k, v in record.items()}, allow_nan=False)


def _write_metrics(path: Path, history: list[dict]) -> None:
    text = "".join(_json_line(r) + "\n" for r in history).encode()
    _atomic_write(path, lambda f: f.write(text))


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(_json_line(record) + "\n")


def _summary(args: argparse.Namespace, result: dict, samples: Path, recons: Path) -> None:
    print(
        f"test ELBO: {-result['test_loss']:.3f} nats per example "
        f"(reconstruction {-result['test_recon']:.3f}, KL {result['test_kl']:.3f})"
    )
    if "test_log_likelihood" in result:
        print(
            f"test log-likelihood (importance-weighted, k={result['log_likelihood_samples']}): "
            f"{result['test_log_likelihood']:.3f} nats per example"
        )
    print(f"samples:         {samples}")
    print(f"reconstructions: {recons}")
    print(f"metrics:         {args.out / METRICS}")
    print(f"checkpoint:      {args.out / CHECKPOINT}")


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: ``vae-fast-train`` (``python -m vae_fast.train``)."""
    run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
