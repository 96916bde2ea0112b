"""What a run leaves on disk and --resume reads back: checkpoint.pt (the run's identity,
weights, optimizer and RNG state), replaced atomically, and metrics.jsonl, rewritten
atomically when a run starts or resumes and then appended one line per epoch."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import vae_fast
from vae_fast.train.config import Config, ConfigError, Runtime
from vae_fast.train.evaluate import PICTURES

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
    "bound",
    "num_samples",
    "estimator",
    "weight_decay",
    "seed",
    "amp",
    "backend",
    "accumulate",  # compared as shards per step: processes x --accumulate
)
# Identity options added after format 1 was first written: a checkpoint without them
# was written with these values.
_IDENTITY_DEFAULTS = {
    "bound": "elbo",
    "num_samples": 1,
    "estimator": None,
    "amp": "none",
    "backend": "fused",
    "accumulate": 1,
}
# What a checkpoint of format 1 holds (see save_checkpoint), with each entry's type.
_CHECKPOINT_ENTRIES = {
    "config": dict,
    "epoch": int,
    "history": list,
    "objective": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": list,
}


def identity(cfg: Config) -> dict:
    """The IDENTITY options of `cfg` as plain data (tuples as lists), in --help's order."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in IDENTITY}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain data: weights_only
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np_state,
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
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


def gather_rng(rt: Runtime) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: every rank calls it)."""
    state = rng_state()
    if not rt.distributed:
        return [state]
    states: list = [None] * rt.world
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- files


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
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


def json_line(record: dict, digits: int | None = None) -> str:
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


def write_metrics(path: Path, history: list[dict]) -> None:
    text = "".join(json_line(r) + "\n" for r in history).encode()
    atomic_write(path, lambda f: f.write(text))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json_line(record) + "\n")


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    cfg: Config,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    history: list[dict],
    rng: list[dict],
) -> None:
    """Everything --resume needs, written atomically to --out/checkpoint.pt (rank 0)."""
    ckpt = {
        "format": 1,
        "config": identity(cfg),
        "epoch": epoch,
        "history": history,
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "vae_fast": vae_fast.__version__,
    }
    atomic_write(cfg.out / CHECKPOINT, lambda f: torch.save(ckpt, f))


def start(
    cfg: Config,
    rt: Runtime,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, list[dict]]:
    """The epoch the run starts after and the metrics so far: (0, []) for a new run; with
    --resume, the checkpoint's, its weights, optimizer and RNG state restored. Rank 0
    (re)writes metrics.jsonl to match (dropping lines of epochs after the checkpoint)."""
    if not cfg.resume:
        if (cfg.out / CHECKPOINT).exists() and not cfg.overwrite:
            # (Forgetting --resume after a Ctrl-C would otherwise lose the run.)
            raise ConfigError(
                f"--out {cfg.out} holds a run ({CHECKPOINT}); continue it with --resume, or "
                "start over with --overwrite"
            )
        if rt.main:
            # Starting over: nothing of the old run stays to be mistaken for this one's.
            for name in (CHECKPOINT, *PICTURES):
                (cfg.out / name).unlink(missing_ok=True)
            write_metrics(cfg.out / METRICS, [])
        return 0, []
    ckpt = load_checkpoint(cfg, rt)
    try:
        objective.load_state_dict(ckpt["objective"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == rt.world:
            set_rng_state(ckpt["rng"][rt.rank])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
        raise ConfigError(
            f"--resume: {cfg.out / CHECKPOINT} does not fit this run's model and "
            f"optimizer ({first_sentence(error)})"
        ) from None
    if rt.main:
        write_metrics(cfg.out / METRICS, ckpt["history"])
    return ckpt["epoch"], ckpt["history"]


def first_sentence(error: BaseException, limit: int = 100) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: Path) -> dict:
    """torch.load `path` and check that it is a checkpoint of this command; anything
    else (truncated, empty, garbage, another program's file) is a one-line ConfigError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError (zip), ...
        why = "the file is empty" if path.stat().st_size == 0 else first_sentence(error)
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
    if not bad:
        # One metrics record per epoch done, each with the test loss the summary reads.
        epoch, history = ckpt["epoch"], ckpt["history"]
        if epoch < 0:
            bad.append(f"epoch {epoch}")
        if len(history) != epoch or not all(
            isinstance(r, dict) and isinstance(r.get("test_loss"), float) for r in history
        ):
            bad.append("history")
    if bad:
        raise ConfigError(
            f"--resume: {path} is not a complete vae-fast-train checkpoint (missing or bad: "
            f"{', '.join(bad)})"
        )
    return ckpt


def load_checkpoint(cfg: Config, rt: Runtime) -> dict:
    """Rank 0 reads the checkpoint and hands it to every rank (no shared disk needed)."""
    box: list = [None]
    if rt.main:
        path, ckpt = cfg.out / CHECKPOINT, None
        if not path.exists():
            box[0] = ConfigError(f"--resume: no checkpoint at {path}")
        else:
            try:
                ckpt = read_checkpoint(path)
            except ConfigError as error:
                ckpt, box[0] = None, error
        if ckpt is not None:
            want, have = identity(cfg), ckpt["config"]
            have = {**_IDENTITY_DEFAULTS, **have}
            diff = [k for k in IDENTITY if k != "accumulate" and want.get(k) != have.get(k)]
            # Each step's batch is cut into one shard per process and accumulation step,
            # each with its own noise: 2 processes resume exactly as 1 with --accumulate 2.
            shards = (len(ckpt["rng"]) * have["accumulate"], rt.world * cfg.accumulate)
            if diff:
                k = diff[0]
                box[0] = ConfigError(
                    f"--resume: {path} was written with --{k.replace('_', '-')} {have.get(k)}, "
                    f"this run has {want.get(k)}; use the same options"
                )
            elif shards[0] != shards[1]:
                box[0] = ConfigError(
                    f"--resume: {path} was written with {shards[0]} shards per step (processes "
                    f"x --accumulate), this run has {shards[1]}; use the same product"
                )
            else:
                box[0] = ckpt
    if rt.distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConfigError):
        raise box[0]
    return box[0]
