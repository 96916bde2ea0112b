"""What a run of bench/ops.py or bench/train.py is besides its timings: torch's set-up, the
machine's facts, and the JSON record it writes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# --------------------------------------------------------------------------- set-up


def setup_torch(device: str, threads: int | None, compile: bool) -> None:
    """All cores by default; enough torch.compile cache for one graph per shape."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(threads or available_cores())
    if not compile:  # importing torch._dynamo alone takes seconds
        return
    import torch._dynamo.config as dynamo_config

    # One compiled graph per (shape, grad mode): the default limit of 8 would
    # silently fall back to eager in a sweep and time the wrong thing.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 1024))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_vae_backend(requested: str) -> str:
    """Which vae_fast backend the "vae_fast" provider runs.

    "auto" runs the fused kernels when the compiled extension loads and otherwise
    the reference (plain torch) backend *standing in*, loudly labelled as such in
    every table and in the JSON, so that a result is never mistaken for the kernels'.
    """
    from vae_fast._extension import LOAD_ERROR

    built = LOAD_ERROR is None
    if requested == "fused" and not built:
        raise SystemExit(f"--vae-backend fused: vae_fast._C is not available ({LOAD_ERROR})")
    if requested == "reference" or (requested == "auto" and not built):
        if requested == "auto":
            warnings.warn(
                "vae_fast._C is not built: the 'vae_fast' provider runs the REFERENCE backend "
                "as a stand-in; these numbers say nothing about the fused kernels",
                stacklevel=2,
            )
        return "reference"
    return "fused"


# --------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return run.stdout.strip()


def machine_meta(device: str, vae_backend: str) -> dict:
    import vae_fast

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "vae_fast_version": getattr(vae_fast, "__version__", "unknown"),
        "vae_fast_backend": vae_backend,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores": available_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's vector ISA
        # the instruction set vae_fast's CPU kernels ran with (ATEN_CPU_CAPABILITY caps it)
        "vae_fast_cpu_capability": _vae_fast_capability(),
        "threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "load_average_start": _loadavg(),
    }
    return meta


def _vae_fast_capability() -> str | None:
    from vae_fast._extension import LOAD_ERROR

    if LOAD_ERROR is not None:
        return None
    from vae_fast import _C

    return _C.cpu_capability()


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def finish_meta(meta: dict, started: float) -> None:
    meta["load_average_end"] = _loadavg()
    meta["wall_time_s"] = round(time.perf_counter() - started, 1)


def warn_if_busy(meta: dict) -> None:
    load = meta.get("load_average_start")
    if load and load[0] > 0.5:
        print(
            f"note: load average {load[0]} at start on {meta['cpu_cores']} cores; other work on "
            "this machine makes CPU timings noisy",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- a run and its JSON

OUTPUT_OPTIONS = ("json", "append", "markdown", "plot")


@dataclass
class Session:
    """One run of a script, from setting torch up to the record its JSON holds."""

    meta: dict
    started: float

    @classmethod
    def begin(cls, args: argparse.Namespace, compile: bool) -> Session:
        started = time.perf_counter()
        setup_torch(args.device, args.threads, compile)
        meta = machine_meta(args.device, resolve_vae_backend(args.vae_backend))
        warn_if_busy(meta)
        return cls(meta, started)

    @property
    def vae_backend(self) -> str:
        return self.meta["vae_fast_backend"]

    def finish(self, kind: str, config: dict, results: list[dict], **extra) -> dict:
        """The run's record: {"kind", "meta", "config", **extra, "results"}."""
        finish_meta(self.meta, self.started)
        return {"kind": kind, "meta": self.meta, "config": config, **extra, "results": results}


def options(args: argparse.Namespace) -> dict:
    """The run's options as its JSON records them: all but where the output goes."""
    return {k: v for k, v in vars(args).items() if k not in OUTPUT_OPTIONS}


def write_json(path: str, run: dict, append: bool) -> None:
    """Write {"runs": [run]}; with `append`, add `run` to the runs already in the file."""
    target = Path(path)
    runs: list = []
    if append and target.exists():
        with open(target) as f:
            runs = json.load(f).get("runs", [])
    runs.append(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
        f.write("\n")
