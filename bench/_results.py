"""Reading the results JSON of bench/ops.py and bench/train.py: its runs, and named views of
their records, for bench/report.py and bench/targets.py.

A file holds {"runs": [run, ...]}; each run is {"kind": "ops" | "train", "meta", "config",
"results": [record, ...]} (bench/README.md, "The JSON", lists every field).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

MODE_TITLE = {"forward": "fwd", "full": "fwd+bwd"}
PEERS = ("eager", "distributions", "compile")  # the providers vae_fast's speedup is over
ROOFS = ("roof", "roof_alloc")  # the providers that time memory bandwidth, not an op


class Sweep(NamedTuple):
    """A scaling suite of an ops run: the records' "suites" name it, `axis` varies."""

    suite: str
    axis: str
    label: str


SWEEPS = (Sweep("batch_sweep", "B", "batch size B"), Sweep("feature_sweep", "D", "feature size D"))


class Case(NamedTuple):
    """One op at one dtype, size and pass of an ops run: what a table row is about."""

    op: str
    dtype: str
    B: int
    D: int
    Z: int
    mode: str

    @classmethod
    def of(cls, record: dict) -> Case:
        return cls(*(record[name] for name in cls._fields))

    @property
    def size(self) -> str:
        return fmt_size(self.B, self.D, self.Z)

    def match(self) -> dict:
        return self._asdict()


def fmt_size(B: int, D: int, Z: int) -> str:
    return f"{B}×{D}×{Z}"


def load_runs(path: str | Path) -> list[dict]:
    with open(path) as f:
        return json.load(f)["runs"]


def timed(records: list[dict], **match) -> list[dict]:
    """The records that were timed (not errors) and have every field of `match`."""
    return [r for r in records if "median_s" in r and all(r.get(k) == v for k, v in match.items())]


def find(records: list[dict], provider: str, **match) -> dict | None:
    found = timed(records, provider=provider, **match)
    return found[0] if found else None


def cases(records: list[dict], suite: str | None = None, **match) -> list[Case]:
    """The distinct cases among `records` (of `suite`, if given), in run order."""
    out: dict[Case, None] = {}
    for r in timed(records, **match):
        if suite is None or suite in r["suites"]:
            out.setdefault(Case.of(r), None)
    return list(out)


def fmt_mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"
