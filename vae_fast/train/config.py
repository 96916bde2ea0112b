"""The run's configuration: the options and the data resolved once, and checked, into a
frozen `Config` that the rest of the training command reads (and never changes)."""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import vae_fast
from vae_fast.data import Dataset, Prepared

# A batch of at most this many values trains on one thread unless --threads says otherwise.
SMALL_BATCH = 1 << 16
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}
BOUNDS = ("elbo", "iwae")


class ConfigError(ValueError):
    """A bad combination of options; reported as a one-line command-line error."""


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


def _launch_number(name: str, default: int) -> int:
    """A number torchrun sets in the environment; unset or unreadable: `default`."""
    text = os.environ.get(name, "")
    return int(text) if text.strip().isdigit() else default


def launched_as_rank_0() -> bool:
    """Rank 0 of a torchrun launch, or a single process, known before the process group
    exists: by WORLD_SIZE, as start_runtime decides (a stray RANK alone is no launch)."""
    return _launch_number("WORLD_SIZE", 1) <= 1 or _launch_number("RANK", 0) == 0


def start_runtime(device_name: str) -> Runtime:
    """This process's place in the run (torchrun's environment), its process group joined."""
    world = _launch_number("WORLD_SIZE", 1)
    local_rank = _launch_number("LOCAL_RANK", 0)
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available (use --device cpu)")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if world == 1:
        return Runtime(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


@dataclass(frozen=True)
class Schedule:
    """The learning rate and the KL weight of each optimizer step."""

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


@dataclass(frozen=True)
class Config:
    """Every option of the command line (in --help's order) with its default resolved,
    then what follows from the data: the run's length and its schedule."""

    data: str
    data_scale: float | None
    likelihood: str  # as given: "auto" stays "auto" (Prepared.likelihood is the choice)
    workers: int
    model: str
    latent_dim: int
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    activation: str
    obs_logvar: str
    batch_size: int
    accumulate: int
    epochs: int  # default: 300 on digits, 20 otherwise
    steps: int | None
    lr: float
    lr_scaling: str
    lr_batch: int
    warmup_steps: int | None  # as given; `schedule` holds the default's value
    weight_decay: float
    beta: float
    inplace_grad: bool
    kl_warmup_steps: int | None  # as given; `schedule` holds the default's value
    bound: str
    num_samples: int
    estimator: str | None  # "iwae", "stl" or "dreg" with --bound iwae (default "iwae")
    backend: str
    device: str
    amp: str
    compile: bool
    seed: int
    threads: int | None  # default: 1 for a batch of at most SMALL_BATCH values, else torch's
    out: Path  # default: runs/<data>-<time>
    resume: bool
    overwrite: bool  # start over in an --out that holds a run
    checkpoint_every: int
    stop_after: int | None
    eval_samples: int
    log_every: int  # default: about 10 lines a run
    progress: bool
    # from the data
    steps_per_epoch: int
    total_epochs: int  # the epochs that the run's steps span (--steps may cut the last one)
    schedule: Schedule

    @property
    def stop_epoch(self) -> int:
        """The epoch after which this invocation stops (--stop-after, else the last)."""
        return min(self.total_epochs, self.stop_after or self.total_epochs)


def resolve(args: argparse.Namespace, data: Dataset, prep: Prepared, rt: Runtime) -> Config:
    """Check the options against the data and the runtime, fill in every default that
    depends on them, and freeze the result."""
    n_train = prep.train.shape[0]
    _check(args, data, rt, n_train)
    threads = args.threads
    if threads is None and args.batch_size * math.prod(data.event_shape) <= SMALL_BATCH:
        # Tiny matrix products: a second thread saves little and, when the cores are
        # shared, its synchronization costs several times the work (measured on digits).
        threads = 1
    out = args.out
    if out is None:
        out = Path("runs") / f"{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    epochs = args.epochs
    if epochs is None:  # digits is small: it takes many passes (~3300 steps)
        epochs = 300 if args.data == "digits" else 20
    steps_per_epoch = n_train // args.batch_size
    total_steps = args.steps or epochs * steps_per_epoch
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    estimator = args.estimator or ("iwae" if args.bound == "iwae" else None)
    options = dict(
        vars(args),
        estimator=estimator,
        threads=threads,
        out=out,
        epochs=epochs,
        log_every=args.log_every or max(1, math.ceil(total_epochs / 10)),
    )
    return Config(
        **options,
        steps_per_epoch=steps_per_epoch,
        total_epochs=total_epochs,
        schedule=_schedule(args, total_steps),
    )


def _schedule(args: argparse.Namespace, total_steps: int) -> Schedule:
    ratio = args.batch_size / args.lr_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[args.lr_scaling]
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(200, max(1, total_steps // 4))
    kl_warmup = args.kl_warmup_steps
    if kl_warmup is None:  # the importance-weighted bound has no KL weight to ramp
        kl_warmup = 0 if args.bound == "iwae" else min(1500, total_steps // 2)
    return Schedule(args.lr * factor, total_steps, min(warmup, total_steps), args.beta, kl_warmup)


def _check(args: argparse.Namespace, data: Dataset, rt: Runtime, n_train: int) -> None:
    """The run checks: options that cannot work together, with this data or here."""
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
    if args.backend == "fused" and vae_fast._extension.LOAD_ERROR is not None:
        raise ConfigError(
            "--backend fused: vae_fast's compiled extension is not built (`make build`); "
            "use --backend reference"
        )
    if args.resume and args.out is None:
        raise ConfigError("--resume needs the --out DIR of the run to continue")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: pick one")
    _check_bound(args)
    if args.model == "conv" and data.image_shape is None:
        raise ConfigError(
            f"--model conv: {data.name} rows of shape {data.event_shape} are not images; "
            "use --model mlp"
        )


def _check_bound(args: argparse.Namespace) -> None:
    """--bound, --num-samples and --estimator against the options they exclude."""
    if args.bound == "elbo":
        if args.estimator is not None:
            raise ConfigError(
                f"--estimator {args.estimator} applies to --bound iwae only (the ELBO's "
                "gradient is the reparameterization gradient)"
            )
        return
    if args.beta != 1.0 or args.kl_warmup_steps:
        raise ConfigError(
            "--bound iwae has no KL term to weight: --beta and --kl-warmup-steps apply to "
            "--bound elbo only"
        )
    if args.inplace_grad:
        raise ConfigError("--inplace-grad applies to --bound elbo only")
    if args.estimator == "dreg" and args.compile:
        raise ConfigError(
            "--estimator dreg cannot run under --compile (its weights reach the sampler's "
            "backward at run time); use --estimator stl, or drop --compile"
        )


def startup_line(cfg: Config, data: Dataset, prep: Prepared, rt: Runtime, start_epoch: int) -> str:
    """One line with what the run chose: data, likelihood, model, device, threads, batch,
    learning rate, length (the defaults and 'auto' choices included)."""
    shape = "x".join(map(str, data.event_shape))
    reading = f", {data.reading}" if data.reading else ""
    why = "values in [0, 1]" if prep.likelihood == "bernoulli" else "real values, standardized"
    likelihood = prep.likelihood + (f" (auto: {why})" if cfg.likelihood == "auto" else "")
    if cfg.model == "conv":
        model = f"conv channels {','.join(map(str, cfg.channels))} fc {cfg.hidden[0]}"
    else:
        model = f"mlp hidden {','.join(map(str, cfg.hidden))}"
    device = str(rt.device) + (f" x {rt.world} processes" if rt.distributed else "")
    threads = torch.get_num_threads()
    sched = cfg.schedule
    lr = f"{sched.peak_lr:.3g}"
    if not math.isclose(sched.peak_lr, cfg.lr):
        lr += f" (--lr {cfg.lr:g} at batch {cfg.lr_batch}, {cfg.lr_scaling} scaling)"
    length = f"{cfg.total_epochs} epochs ({sched.total_steps} steps)"
    if sched.kl_warmup_steps:
        length += f", KL weight 0 -> {cfg.beta:g} over {sched.kl_warmup_steps} steps"
    if start_epoch:
        length += f", resuming after epoch {start_epoch}"
    bound = cfg.bound + (f" K={cfg.num_samples}" if cfg.num_samples > 1 else "")
    if cfg.estimator:
        bound += f" ({cfg.estimator} gradients)"
    return (
        f"data {cfg.data} ({data.train.shape[0]} train + {data.test.shape[0]} test rows of "
        f"{shape}{reading}); likelihood {likelihood}; objective {bound}; "
        f"model {model} latent {cfg.latent_dim}; "
        f"device {device}; {threads} thread{'s' if threads > 1 else ''}; batch "
        f"{cfg.batch_size}; lr {lr}; {length}; out {cfg.out}"
    )
