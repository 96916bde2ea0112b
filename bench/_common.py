"""What bench/ops.py and bench/train.py share: timing, memory, machine facts, output.

Timing follows the usual rules for a fair comparison (Liger-Kernel's benchmark
scripts, xformers' torch.utils.benchmark ones): every provider is warmed up outside
the timing (torch.compile compiles there), then the providers are timed
*interleaved*, round after round, so that a noisy neighbour on a shared machine
slows all of them alike instead of whichever happened to run at that moment.
Each call is timed on its own (CUDA events on a GPU, perf_counter on the CPU) and
the median is reported with the 20th and 80th percentiles.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
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


def resolve_vae_backend(requested: str) -> tuple[str, str]:
    """Which vae_fast backend the "vae_fast" provider runs, and how to label it.

    "auto" runs the fused kernels when the compiled extension loads and otherwise
    the reference (plain torch) backend *standing in*, loudly labelled as such in
    every table and in the JSON, so that a result is never mistaken for the kernels'.
    """
    import vae_fast.ops as vops

    built = vops._LOAD_ERROR is None
    if requested == "fused" and not built:
        raise SystemExit(f"--vae-backend fused: vae_fast._C is not available ({vops._LOAD_ERROR})")
    if requested == "reference" or (requested == "auto" and not built):
        if requested == "auto":
            warnings.warn(
                "vae_fast._C is not built: the 'vae_fast' provider runs the REFERENCE backend "
                "as a stand-in; these numbers say nothing about the fused kernels",
                stacklevel=2,
            )
        return "reference", "vae_fast (reference stand-in)"
    return "fused", "vae_fast"


# --------------------------------------------------------------------------- timing


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":

        def time_one(fn: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return time_one

    def time_one(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_one


def summarize(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_s": statistics.median(s),
        "p20_s": _quantile(s, 0.2),
        "p80_s": _quantile(s, 0.8),
        "min_s": s[0],
        "mean_s": statistics.fmean(s),
        "n": len(s),
    }


def _quantile(sorted_samples: list[float], q: float) -> float:
    pos = q * (len(sorted_samples) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: str,
    min_time: float,
    rounds: int,
    warmup: int,
    max_calls_per_round: int = 200,
) -> dict[str, dict[str, float] | dict[str, str]]:
    """Median time of each callable, timed round-robin after a warm-up.

    Each provider gets about `min_time` seconds in total, spread over `rounds`
    rounds (at least one call per round, so a slow provider gets `rounds` samples
    and a fast one many more). A provider that raises is reported as an error.
    """
    time_one = _timer(device)
    estimate: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            estimate[name] = max(time_one(fn), 1e-7)
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    samples: dict[str, list[float]] = {name: [] for name in estimate}
    per_round = min_time / rounds
    for _ in range(rounds):
        for name in estimate:
            calls = int(min(max(per_round / estimate[name], 1), max_calls_per_round))
            fn = fns[name]
            for _ in range(calls):
                samples[name].append(time_one(fn))
    out: dict[str, dict] = {name: summarize(s) for name, s in samples.items()}
    out.update({name: {"error": e} for name, e in errors.items()})
    return out


# --------------------------------------------------------------------------- memory


def peak_extra_memory(fn: Callable[[], object], device: str) -> dict[str, int]:
    """Bytes allocated by one call of `fn` beyond what was live before it.

    peak_bytes: the most that was live at once (on CUDA torch.cuda.max_memory_allocated,
    on the CPU the running sum of the torch profiler's allocation records);
    retained_bytes: what is still live after the call (the gradients left in .grad);
    transient_bytes: peak_bytes - retained_bytes, what the call needed only while it ran;
    total_bytes: everything allocated during the call, freed or not.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        allocated_before = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0)
        fn()
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        return _memory_record(
            torch.cuda.max_memory_allocated() - base,
            torch.cuda.memory_allocated() - base,
            stats.get("allocated_bytes.all.allocated", 0) - allocated_before,
        )
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    records: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            records.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    records.sort()
    live = peak = total = 0
    for _, size in records:
        live += size
        peak = max(peak, live)
        total += max(size, 0)
    return _memory_record(peak, live, total)


def _memory_record(peak: int, retained: int, total: int) -> dict[str, int]:
    peak, retained = int(peak), max(int(retained), 0)
    return {
        "peak_bytes": peak,
        "retained_bytes": retained,
        "transient_bytes": max(peak - retained, 0),
        "total_bytes": int(total),
    }


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
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
        "threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "load_average_start": _loadavg(),
    }
    return meta


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


# --------------------------------------------------------------------------- output


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


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else (f"{r:.1f}×" if r < 100 else f"{r:.0f}×")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(meta: dict) -> str:
    name = meta["device_name"]
    return (
        f"{name}, {meta['threads']} threads ({meta['cpu_cores']} cores), torch "
        f"{meta['torch_version']}, vae_fast {meta['vae_fast_version']} ({meta['git_commit']}, "
        f"backend: {meta['vae_fast_backend']}), {meta['date']}, load average "
        f"{meta.get('load_average_start')} → {meta.get('load_average_end')}"
    )
