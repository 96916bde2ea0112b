"""What bench/ops.py and bench/train.py share to time and to weigh: interleaved timing and
the peak extra memory of a call.

Timing follows the usual rules for a fair comparison (Liger-Kernel's benchmark
scripts, xformers' torch.utils.benchmark ones): every provider is warmed up outside
the timing (torch.compile compiles there), then the providers are timed
*interleaved*, round after round, so that a noisy neighbour on a shared machine
slows all of them alike instead of whichever happened to run at that moment.
Each call is timed on its own (CUDA events on a GPU, perf_counter on the CPU) and
the median is reported with the 20th and 80th percentiles.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)  # what names a callable: a provider, a variant

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
    fns: dict[K, Callable[[], object]],
    *,
    device: str,
    min_time: float,
    rounds: int,
    warmup: int,
    max_calls_per_round: int = 200,
) -> dict[K, dict[str, float] | dict[str, str]]:
    """Median time of each callable, timed round-robin after a warm-up.

    Each provider gets about `min_time` seconds in total, spread over `rounds`
    rounds (at least one call per round, so a slow provider gets `rounds` samples
    and a fast one many more). A provider that raises is reported as an error.
    """
    time_one = _timer(device)
    estimate: dict[K, float] = {}
    errors: dict[K, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            estimate[name] = max(time_one(fn), 1e-7)
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            errors[name] = describe_error(error)
    samples: dict[K, list[float]] = {name: [] for name in estimate}
    round_medians: dict[K, list[float]] = {name: [] for name in estimate}
    per_round = min_time / rounds
    for _ in range(rounds):
        for name in estimate:
            calls = int(min(max(per_round / estimate[name], 1), max_calls_per_round))
            fn = fns[name]
            this_round = [time_one(fn) for _ in range(calls)]
            samples[name] += this_round
            round_medians[name].append(statistics.median(this_round))
    # Each round's median too: two providers' ratio round by round (`ratio_spread`)
    # says how far the machine's drift moves a comparison within the run.
    out: dict[K, dict] = {
        name: {**summarize(s), "round_medians_s": round_medians[name]}
        for name, s in samples.items()
    }
    out.update({name: {"error": e} for name, e in errors.items()})
    return out


def ratio_spread(slower: dict, faster: dict) -> tuple[float, float] | None:
    """The 20th and 80th percentiles over the rounds of `slower`'s time over `faster`'s
    in the same round (two measure_interleaved results); None without round medians."""
    a, b = slower.get("round_medians_s"), faster.get("round_medians_s")
    if not a or not b or len(a) != len(b):
        return None
    ratios = sorted(x / y for x, y in zip(a, b))
    return _quantile(ratios, 0.2), _quantile(ratios, 0.8)


def describe_error(error: Exception) -> str:
    """One line for the JSON: the exception's type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


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
