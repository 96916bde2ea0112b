"""Smoke test of the benchmark scripts: they run, and their JSON has what readers rely on.

Tiny sizes, one thread (a busy 2-core machine stalls OpenMP barriers), no
torch.compile (its cold compile alone takes longer than this test may). The numbers
are meaningless; the point is that `make bench` will not fail after an hour.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / script),
            "--quick",
            "--threads",
            "1",
            "--min-time",
            "0.01",
            "--rounds",
            "2",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _only_run(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 1
    run = data["runs"][0]
    for key in ("torch_version", "device_name", "threads", "date", "vae_fast_backend"):
        assert key in run["meta"], key
    assert run["meta"]["threads"] == 1
    return run


def test_ops_quick(tmp_path):
    out = tmp_path / "ops.json"
    extra = []
    if importlib.util.find_spec("matplotlib") is not None:
        extra = ["--plot", str(tmp_path / "ops.png")]
    options = (
        "--sizes 64x48x8 --ops elbo_bernoulli reparameterize "
        "--providers vae_fast eager distributions roof roof_alloc "
        "--batch-sizes 16 64 --feature-sizes 16 48 --sweep-b 16 --sweep-d 48 --sweep-z 8"
    ).split()
    markdown = tmp_path / "ops.md"
    proc = _run("ops.py", *options, "--json", str(out), "--markdown", str(markdown), *extra)
    run = _only_run(out)
    results = run["results"]
    ok = [r for r in results if "median_s" in r]
    assert len(ok) == len(results), [r.get("error") for r in results if "error" in r]
    providers = {"vae_fast", "eager", "distributions", "roof", "roof_alloc"}
    assert {r["provider"] for r in ok} == providers
    assert {r["op"] for r in ok} == {"elbo_bernoulli", "reparameterize"}
    assert {r["mode"] for r in ok} == {"forward", "full"}
    for r in ok:
        assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["gbps"] > 0 and r["bytes"] > 0
        if not r["provider"].startswith("roof"):
            assert r["frac_roof"] > 0 and r["peak_bytes"] >= r["transient_bytes"] >= 0
    # the fused elbo's ideal traffic at 64x48x8: 3*B*D + 4*B*Z floats
    full = next(
        r for r in ok if r["op"] == "elbo_bernoulli" and r["mode"] == "full" and r["B"] == 64
    )
    assert full["ideal_bytes"] == (3 * 64 * 48 + 4 * 64 * 8) * 4
    mine = next(r for r in ok if r["provider"] == "vae_fast" and r["mode"] == "full")
    assert set(mine["speedup"]) == {"eager", "distributions"}
    sweeps = {s for r in ok for s in r["suites"]}
    assert sweeps == {"sizes", "batch_sweep", "feature_sweep"}
    table = markdown.read_text()
    assert "| B×D×Z |" in table and "Scaling over B" in table
    assert "| 64×48×8 float32 |" in proc.stdout
    if extra:
        assert (tmp_path / "ops.png").stat().st_size > 0


def test_train_quick(tmp_path):
    out = tmp_path / "train.json"
    _run("train.py", "--batch-sizes", "16", "--conv-batch-sizes", "4", "--json", str(out))
    run = _only_run(out)
    results = run["results"]
    assert {(r["model"], r["backend"], r["mode"]) for r in results} == {
        (m, b, "eager") for m in ("mlp", "conv") for b in ("fused", "reference")
    }
    for r in results:
        assert "error" not in r, r["error"]
        assert r["median_s"] > 0 and r["samples_per_s"] > 0
        assert 0 < r["loss_fraction"]
    assert all("speedup_vs_reference" in r for r in results if r["backend"] == "fused")
