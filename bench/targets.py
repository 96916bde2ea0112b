"""Checks a run of bench/ops.py or bench/train.py against the targets in a JSON file
(bench/targets.json by default): one line of text per check, "met" or "**not met**".

The file is {"ops": {"defaults": {...}, "checks": [...]}, "train": {"checks": [...]}}.
An ops check reads vae_fast's records of its "op" at the dtype and pass of "defaults"
(unless it gives its own) and names the op by its "label" (default: the op's name):

  speed              at the one "size" (BxDxZ), vae_fast's fraction of the roof
                     ("frac_roof") and its speedup over each peer reach "at_least";
  ahead_over_sweeps  vae_fast ahead of every peer at every size of each of "sweeps";
  memory             at each of the run's --sizes, the peak extra memory of a call no more
                     than its gradients (the B×D one and the two B×Z ones of mu and logvar,
                     1% allowed) and "less_than_eager" times less than eager's;
  ahead              at each of the run's --sizes, vae_fast ahead of each of "peers".

The train check fused_vs_reference wants the step with the fused loss at least "at_least"
times as fast as the step with the reference at every model, batch size and mode.
A check whose records the run does not have is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

from _results import MODE_TITLE, cases, find, fmt_mib, fmt_size

DEFAULT = Path(__file__).resolve().with_name("targets.json")


def load(path: str | Path | None = DEFAULT) -> dict | None:
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def check(run: dict, targets: dict | None) -> list[str]:
    """The lines of every check of the run's kind, in the file's order."""
    section = (targets or {}).get(run["kind"], {})
    defaults = section.get("defaults", {})
    lines: list[str] = []
    for spec in section.get("checks", []):
        spec = {**defaults, **spec}
        known = _CHECKS[run["kind"]]
        if spec["check"] not in known:
            raise ValueError(f"targets: no {run['kind']} check {spec['check']!r}: {list(known)}")
        lines += known[spec["check"]](run["results"], spec)
    return lines


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _what(spec: dict) -> str:
    return f"{spec.get('label', spec['op'])} {MODE_TITLE[spec['mode']]}"


def _select(spec: dict) -> dict:
    return {"op": spec["op"], "mode": spec["mode"], "dtype": spec["dtype"]}


def _speed(records: list[dict], spec: dict) -> list[str]:
    B, D, Z = (int(v) for v in spec["size"].split("x"))
    rec = find(records, "vae_fast", **_select(spec), B=B, D=D, Z=Z)
    if rec is None:
        return []
    parts = []
    for what, least in spec["at_least"].items():
        if what == "frac_roof":
            frac = rec.get("frac_roof")
            if frac is not None:
                parts.append(
                    (f"{100 * frac:.0f}% of the roof (≥ {100 * least:.0f}%)", frac >= least)
                )
        elif rec.get("speedup", {}).get(what) is not None:
            r = rec["speedup"][what]
            parts.append((f"{r:.1f}× {what} (≥ {least}×)", r >= least))
    if not parts:
        return []
    text = "; ".join(f"{t}: {_mark(ok)}" for t, ok in parts)
    return [f"- {_what(spec)} {fmt_size(B, D, Z)}: {text}"]


def _ahead_over_sweeps(records: list[dict], spec: dict) -> list[str]:
    lines = []
    for suite in spec["sweeps"]:
        found = cases(records, suite, **_select(spec))
        behind = []
        for case in found:
            speedup = (find(records, "vae_fast", **case.match()) or {}).get("speedup", {})
            slower = [p for p, v in speedup.items() if v < 1]
            if slower:
                behind.append(f"{case.size} (behind {', '.join(slower)})")
        if found:
            lines.append(
                f"- {_what(spec)} ahead of every peer over the {suite.replace('_', ' ')} "
                f"({len(found)} sizes): {_mark(not behind)}"
                + (f"; behind at {'; '.join(behind)}" if behind else "")
            )
    return lines


def _memory(records: list[dict], spec: dict) -> list[str]:
    lines = []
    least = spec["less_than_eager"]
    for case in cases(records, "sizes", **_select(spec)):
        rec = find(records, "vae_fast", **case.match())
        eager = find(records, "eager", **case.match())
        if not (rec and eager and rec.get("peak_bytes") and eager.get("peak_bytes")):
            continue
        grads = rec["peak_bytes"] / rec["one_grad_bytes"]
        allowed = 1 + 2 * case.Z / case.D  # the B×D gradient and the two B×Z ones of mu, logvar
        less = eager["peak_bytes"] / rec["peak_bytes"]
        lines.append(
            f"- {_what(spec)} {case.size} peak extra memory: {grads:.3f} B×D "
            f"gradients (≤ {allowed:.3f} with the mu/logvar ones, within 1%): "
            f"{_mark(grads <= allowed * 1.01)}; {less:.1f}× less than eager (≥ {least}×): "
            f"{_mark(less >= least)}; transient {fmt_mib(rec.get('transient_bytes'))} MiB against "
            f"eager's {fmt_mib(eager.get('transient_bytes'))} MiB"
        )
    return lines


def _ahead(records: list[dict], spec: dict) -> list[str]:
    lines = []
    for case in cases(records, "sizes", **_select(spec)):
        speedup = (find(records, "vae_fast", **case.match()) or {}).get("speedup", {})
        got = [(p, speedup[p]) for p in spec["peers"] if p in speedup]
        if got:
            text = ", ".join(f"{v:.1f}× {p}" for p, v in got)
            lines.append(
                f"- {_what(spec)} {case.size}: {text} (ahead of each): "
                f"{_mark(all(v >= 1 for _, v in got))}"
            )
    return lines


def _fused_vs_reference(records: list[dict], spec: dict) -> list[str]:
    least = spec["at_least"]
    ratios = [r for r in records if "speedup_vs_reference" in r]
    if not ratios:
        return []
    slower = [r for r in ratios if r["speedup_vs_reference"] < least]
    text = "; ".join(
        f"{r['model']} B={r['batch']} {r['mode']} {r['speedup_vs_reference']:.2f}×" for r in slower
    )
    fast = "as fast" if least == 1 else f"{least}× as fast"
    return [
        f"Target: a step with the fused loss at least {fast} as the reference everywhere "
        f"({len(ratios)} cases): " + ("met" if not slower else f"**not met** at {text}")
    ]


_CHECKS = {
    "ops": {
        "speed": _speed,
        "ahead_over_sweeps": _ahead_over_sweeps,
        "memory": _memory,
        "ahead": _ahead,
    },
    "train": {"fused_vs_reference": _fused_vs_reference},
}
