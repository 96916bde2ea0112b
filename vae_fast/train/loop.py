"""The training of a resolved Config: the objective, one optimizer step, and the epoch
loop, in three parts: set-up, an epoch of steps, and the epoch's record (evaluation,
metrics line, checkpoint).

Reproducibility: the data order comes from (seed, epoch) and every random draw of a
training step (dynamic binarization, the reparameterization noise) from a generator
seeded with (seed, step, shard), where the global batch is cut into
``world_size * accumulate`` interleaved shards. So a run gives the same numbers on 1
process with ``--accumulate 2`` as on 2 processes, and a ``--resume`` continues exactly
where the uninterrupted run would be.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from vae_fast.data import Dataset, Prepared
from vae_fast.train.checkpoint import (
    CHECKPOINT,
    METRICS,
    append_metrics,
    gather_rng,
    json_line,
    save_checkpoint,
    start,
)
from vae_fast.train.config import Config, ConfigError, Runtime, startup_line
from vae_fast.train.evaluate import evaluate, evaluate_log_likelihood, pictures
from vae_fast.train.objective import Objective, build_objective


class Diverged(RuntimeError):
    """The loss or the weights became non-finite: the run stops (exit status 1)."""


class Interrupted(Exception):
    """Ctrl-C during training; the message says where --resume continues."""


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of one shard's noise at one step: independent streams, same on any world size."""
    state = np.random.SeedSequence([seed, step, shard]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def train_step(
    trainer: nn.Module,
    xb: torch.Tensor,
    step: int,
    *,
    cfg: Config,
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
    for a in range(cfg.accumulate):
        micro = xb[a :: cfg.accumulate].to(rt.device, non_blocking=True)
        noise.manual_seed(shard_seed(cfg.seed, step, rt.rank + rt.world * a))
        if binarize:  # dynamic binarization: a fresh draw of the pixels every step
            micro = torch.bernoulli(micro, generator=noise)
        last = a == cfg.accumulate - 1
        # DDP all-reduces the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if last or not rt.distributed else trainer.no_sync()
        with sync:
            with amp:
                loss, _, _ = trainer(micro, noise)
            scaler.scale(loss / cfg.accumulate).backward()
        total += loss.detach().double() / cfg.accumulate
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


class _Rows(torch.utils.data.Dataset):
    """Rows of one tensor, fetched a whole batch of indices at a time."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: list[int]) -> torch.Tensor:
        return self.x[index]


def _batches(loader: DataLoader, limit: int) -> Iterator[torch.Tensor]:
    for i, xb in enumerate(loader):
        if i >= limit:
            return
        yield xb


def _finite_weights(module: nn.Module) -> bool:
    """Whether every parameter of `module` is finite (one host read for all of them)."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


# --------------------------------------------------------------------------- the loop


@dataclass
class _State:
    """What the epochs share: the modules and the data feed, and how far the run is."""

    objective: Objective
    trainer: nn.Module  # the objective, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    loader: DataLoader
    amp: contextlib.AbstractContextManager
    noise: torch.Generator
    bar: Any  # the tqdm progress bar, or None
    start_epoch: int
    history: list[dict]  # one record per epoch done, as in metrics.jsonl
    step: int  # optimizer steps done
    saved: int | None  # the epoch that checkpoint.pt holds


def train(cfg: Config, data: Dataset, prep: Prepared, rt: Runtime) -> dict:
    """Train from scratch or from --resume's checkpoint to --stop-after or the end, and
    return the last epoch's record. Raises Diverged on a non-finite loss or weights and
    Interrupted on Ctrl-C during the epochs."""
    s = _set_up(cfg, data, prep, rt)
    try:
        for epoch in range(s.start_epoch, cfg.stop_epoch):
            _record(cfg, prep, rt, s, epoch, _epoch(cfg, prep, rt, s, epoch))
        if s.bar is not None:
            s.bar.close()  # before the summary's lines
            s.bar = None
        result = s.history[-1] if s.history else {}
        if rt.main and cfg.stop_epoch == cfg.total_epochs:
            s.objective.eval()
            samples, recons = pictures(s.objective, prep, data, cfg.out, cfg.seed, rt.device)
            _summary(cfg, result, samples, recons)
        elif rt.main and s.start_epoch >= cfg.total_epochs:
            print(f"the run in {cfg.out} is finished (epoch {s.start_epoch} of {cfg.total_epochs})")
        elif rt.main and s.start_epoch >= cfg.stop_epoch:
            print(
                f"the checkpoint is already at epoch {s.start_epoch} of {cfg.total_epochs}, "
                f"past --stop-after {cfg.stop_epoch}: nothing trained; continue with "
                f"--resume --out {cfg.out}"
            )
        elif rt.main:
            print(
                f"stopped after epoch {cfg.stop_epoch} of {cfg.total_epochs}; "
                f"continue with --resume --out {cfg.out}"
            )
        return result
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; `--resume` continues from epoch {s.saved}"
            if s.saved
            else "interrupted before the first checkpoint; nothing to resume (start again)"
        ) from None
    finally:
        if s.bar is not None:
            s.bar.close()


def _no_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's option not to broadcast buffers before every forward (the
    ranks' buffers are equal): `forward_sync_buffers` where torch has it, the deprecated
    `broadcast_buffers` in older releases."""
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return {key: False}


def _set_up(cfg: Config, data: Dataset, prep: Prepared, rt: Runtime) -> _State:
    """The output directory, the seeded modules (restored on --resume), the data feed,
    the start-up line and the progress bar."""
    device = rt.device
    if rt.main:
        try:
            cfg.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = error.strerror
            raise ConfigError(f"--out {cfg.out}: cannot create the directory ({why})") from None
    # The same initialization on every rank (DDP would broadcast rank 0's anyway).
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg, data, prep.likelihood, device).to(device)
    random.seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)
    torch.manual_seed(cfg.seed + rt.rank)
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=cfg.schedule.lr(0), weight_decay=cfg.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, history = start(cfg, rt, objective, optimizer, scaler)

    if cfg.compile:
        objective.model.encoder.compile()
        objective.model.decoder.compile()
    trainer: nn.Module = objective
    if rt.distributed:
        trainer = DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_no_buffer_sync(),
        )
    sampler = DistributedSampler(
        _Rows(prep.train),
        num_replicas=rt.world,
        rank=rt.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    loader = DataLoader(
        _Rows(prep.train),
        batch_size=None,
        sampler=BatchSampler(sampler, cfg.batch_size // rt.world, drop_last=True),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
        if cfg.amp != "none"
        else contextlib.nullcontext()
    )

    if rt.main:
        print(startup_line(cfg, data, prep, rt, start_epoch), flush=True)
    bar = None
    if rt.main and cfg.progress and start_epoch < cfg.total_epochs:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.schedule.total_steps,
            initial=start_epoch * cfg.steps_per_epoch,
            unit="step",
            dynamic_ncols=True,
            desc=data.name,
        )
    return _State(
        objective=objective,
        trainer=trainer,
        optimizer=optimizer,
        scaler=scaler,
        sampler=sampler,
        loader=loader,
        amp=amp,
        noise=torch.Generator(device=device),
        bar=bar,
        start_epoch=start_epoch,
        history=history,
        step=start_epoch * cfg.steps_per_epoch,
        saved=start_epoch if cfg.resume else None,
    )


def _epoch(cfg: Config, prep: Prepared, rt: Runtime, s: _State, epoch: int) -> dict:
    """Train epoch `epoch` (0-based) and return its training record; raise Diverged as
    soon as the loss or the weights are seen to be non-finite."""
    s.objective.train()
    s.sampler.set_epoch(epoch)
    sched, loss_fn = cfg.schedule, s.objective.loss
    n_steps = min(cfg.steps_per_epoch, sched.total_steps - s.step)
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, steps
    t0 = time.perf_counter()
    for i, xb in enumerate(_batches(s.loader, n_steps)):
        lr = sched.lr(s.step)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        loss_fn.beta = sched.kl_weight(s.step)
        sums[0] += train_step(
            s.trainer,
            xb,
            s.step,
            cfg=cfg,
            rt=rt,
            noise=s.noise,
            binarize=prep.likelihood == "bernoulli",
            amp=s.amp,
            scaler=s.scaler,
            optimizer=s.optimizer,
        )
        sums[1] += 1
        s.step += 1
        if s.bar is not None:
            s.bar.update(1)
        # The host reads the loss only every 25 steps (a read waits for the device).
        # One process stops there on a nan; processes of a distributed run check
        # together at the end of the epoch, where they all-reduce.
        if (i % 25 == 0 or i == n_steps - 1) and (s.bar is not None or not rt.distributed):
            mean = float(sums[0] / sums[1])
            if not rt.distributed and not math.isfinite(mean):
                raise _diverged(cfg, s, f"the training loss became {mean} by step {s.step}")
            if s.bar is not None:
                postfix = {"epoch": epoch + 1, "loss": f"{mean:.3f}"}
                if loss_fn.beta < sched.beta:  # KL warm-up: why the loss may rise
                    postfix["beta"] = f"{loss_fn.beta:.3g}"
                rate = (i + 1) * cfg.batch_size / (time.perf_counter() - t0)
                postfix["samples_s"] = f"{rate:,.0f}"
                s.bar.set_postfix(postfix, refresh=False)
    if rt.distributed:
        dist.all_reduce(sums)
    train_loss = float(sums[0] / sums[1])
    # Every process has the same reduced loss and the same weights: they agree.
    if not math.isfinite(train_loss):
        raise _diverged(cfg, s, f"the training loss became {train_loss} in epoch {epoch + 1}")
    if not _finite_weights(s.objective):
        raise _diverged(cfg, s, f"the weights became nan or inf in epoch {epoch + 1}")
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "step": s.step,
        "train_loss": train_loss + prep.log_jacobian,
        "samples_per_s": n_steps * cfg.batch_size / seconds,
        "epoch_time_s": seconds,
        "lr": lr,
        "beta": loss_fn.beta,
    }


def _record(cfg: Config, prep: Prepared, rt: Runtime, s: _State, epoch: int, record: dict) -> None:
    """Complete epoch `epoch`'s record with the test metrics (rank 0), append it to
    metrics.jsonl, print it now and then, and write the checkpoint when one is due."""
    done = epoch + 1
    final = done == cfg.total_epochs
    checkpoint = final or done == cfg.stop_epoch or done % cfg.checkpoint_every == 0
    rng = gather_rng(rt) if checkpoint else None
    if rt.main:
        s.objective.eval()
        test = evaluate(s.objective, prep.test, cfg.seed, rt.device)
        # In data units: the standardization's log-Jacobian belongs to the likelihood term.
        test["test_loss"] += prep.log_jacobian
        test["test_recon"] += prep.log_jacobian
        record.update(test)
        if final and cfg.eval_samples:
            k, t1 = cfg.eval_samples, time.perf_counter()
            ll = evaluate_log_likelihood(s.objective, prep.test, k, cfg.seed, rt.device)
            record["test_log_likelihood"] = ll - prep.log_jacobian
            record["log_likelihood_samples"] = k
            record["log_likelihood_time_s"] = time.perf_counter() - t1
        s.history.append(record)
        append_metrics(cfg.out / METRICS, record)
        if done % cfg.log_every == 0 or final or done == cfg.stop_epoch:
            (s.bar.write if s.bar is not None else print)(json_line(record, 4))
        if checkpoint:
            save_checkpoint(cfg, s.objective, s.optimizer, s.scaler, done, s.history, rng)
    if checkpoint:
        s.saved = done


def _diverged(cfg: Config, s: _State, what: str) -> Diverged:
    kept = (
        f"{cfg.out / CHECKPOINT} keeps epoch {s.saved}, the last good one"
        if s.saved
        else "this run wrote no checkpoint"
    )
    return Diverged(
        f"{what}: the run diverged (lower --lr, now {cfg.lr:g}, or raise --warmup-steps); {kept}"
    )


def _summary(cfg: Config, result: dict, samples: Path, recons: Path) -> None:
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
    print(f"metrics:         {cfg.out / METRICS}")
    print(f"checkpoint:      {cfg.out / CHECKPOINT}")
