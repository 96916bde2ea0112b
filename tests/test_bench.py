"""Smoke test of the benchmark scripts: they run, their JSON has what bench/README.md says it
has, and bench/report.py renders it.

Tiny sizes, one thread (a busy 2-core machine stalls OpenMP barriers), no
torch.compile (its cold compile alone takes longer than this test may). The numbers
are meaningless; the point is that `make bench` will not fail after an hour, and that
the tables made from the JSON are the tables the scripts print.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
pytestmark = pytest.mark.slow


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _quick(script: str, *args: str) -> subprocess.CompletedProcess:
    timing = ("--quick", "--threads", "1", "--min-time", "0.01", "--rounds", "2")
    return _python(script, *timing, *args)


def _documented_fields() -> dict[str, set[str]]:
    """The field names of bench/README.md's "The JSON": meta's, and an ops and a train record's."""
    text = (BENCH / "README.md").read_text()
    block = text.split("## The JSON", 1)[1].split("```")[1]
    block = re.sub(r"\([^)]*\)", "", block)  # ("fused" | "reference") and the like: values

    def names(start: str, end: str) -> set[str]:
        return set(re.findall(r'"(\w+)"', block.split(start, 1)[1].split(end, 1)[0]))

    return {
        "meta": names('"meta":', '"config"'),
        "ops": names("ops:", "or {"),
        "train": names("train:", "]}]}"),
    }


def _only_run(path: Path, kind: str) -> dict:
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 1
    run = data["runs"][0]
    assert run["kind"] == kind
    missing = _documented_fields()["meta"] - set(run["meta"])
    assert not missing, f"meta lacks what bench/README.md lists: {missing}"
    assert run["meta"]["threads"] == 1
    return run


def _report(json_path: Path, tmp_path: Path, *args: str) -> str:
    """bench/report.py's markdown of a results file."""
    out = tmp_path / f"{json_path.stem}.report.md"
    _python("report.py", str(json_path), "--markdown", str(out), *args)
    return out.read_text()


def test_ops_quick(tmp_path):
    out, markdown = tmp_path / "ops.json", tmp_path / "ops.md"
    plot = ["--plot", str(tmp_path / "ops.png")] if HAS_MATPLOTLIB else []
    options = (
        "--sizes 64x48x8 --ops elbo_bernoulli reparameterize "
        "--providers vae_fast eager distributions roof roof_alloc "
        "--batch-sizes 16 64 --feature-sizes 16 48 --sweep-b 16 --sweep-d 48 --sweep-z 8"
    ).split()
    proc = _quick("ops.py", *options, "--json", str(out), "--markdown", str(markdown), *plot)
    run = _only_run(out, "ops")
    assert set(run["bytes_formulas"]) >= {"elbo_bernoulli", "reparameterize"}
    assert run["config"]["sizes"] == ["64x48x8"] and run["config"]["sweep_b"] == 16
    results = run["results"]
    ok = [r for r in results if "median_s" in r]
    assert len(ok) == len(results), [r.get("error") for r in results if "error" in r]
    providers = {"vae_fast", "eager", "distributions", "roof", "roof_alloc"}
    assert {r["provider"] for r in ok} == providers
    assert {r["op"] for r in ok} == {"elbo_bernoulli", "reparameterize"}
    assert {r["mode"] for r in ok} == {"forward", "full"}
    documented = _documented_fields()["ops"]
    for r in ok:
        assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["gbps"] > 0 and r["bytes"] > 0
        # the speedups are vae_fast's; the roofs have no memory pass
        absent = set() if r["provider"] == "vae_fast" else {"speedup", "speedup_spread"}
        if r["provider"].startswith("roof"):
            absent |= {"peak_bytes", "retained_bytes", "transient_bytes", "total_bytes"}
        else:
            assert r["frac_roof"] > 0 and r["peak_bytes"] >= r["transient_bytes"] >= 0
        missing = documented - set(r) - absent
        assert not missing, f"{r['provider']} lacks what bench/README.md lists: {missing}"
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
    assert "| B×D×Z |" in table and "Scaling over B" in table and "Scaling over D" in table
    assert "| 64×48×8 float32 |" in proc.stdout
    assert "### Targets in this run" in table  # bench/targets.json's reparameterize check
    assert "issue" not in table.lower()
    # the tables made from the JSON alone are those the script printed and wrote
    assert _report(out, tmp_path) == table
    assert proc.stdout.startswith(table)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "ops.png").stat().st_size > 0


def test_train_quick(tmp_path):
    out, markdown = tmp_path / "train.json", tmp_path / "train.md"
    sizes = ("--batch-sizes", "16", "--conv-batch-sizes", "4")
    _quick("train.py", *sizes, "--json", str(out), "--markdown", str(markdown))
    run = _only_run(out, "train")
    results = run["results"]
    assert {(r["model"], r["backend"], r["mode"]) for r in results} == {
        (m, b, "eager") for m in ("mlp", "conv") for b in ("fused", "reference")
    }
    documented = _documented_fields()["train"]
    for r in results:
        assert "error" not in r, r["error"]
        assert r["median_s"] > 0 and r["samples_per_s"] > 0
        assert 0 < r["loss_fraction"]
        absent = set() if r["backend"] == "fused" else {"speedup_vs_reference"}
        missing = documented - set(r) - absent
        assert not missing, f"{r['backend']} lacks what bench/README.md lists: {missing}"
    table = markdown.read_text()
    assert "| model | batch | fused eager samples/s |" in table
    assert "Target: a step with the fused loss" in table and "issue" not in table.lower()
    assert _report(out, tmp_path) == table
    if HAS_MATPLOTLIB:
        png = tmp_path / "train.png"
        _python("report.py", str(out), "--markdown", str(tmp_path / "x.md"), "--plot", str(png))
        assert png.stat().st_size > 0


def test_iwae_quick(tmp_path):
    out, markdown = tmp_path / "iwae.json", tmp_path / "iwae.md"
    args = ("--quick", "--threads", "1", "--samples", "1", "3")
    proc = _python("iwae.py", *args, "--json", str(out), "--markdown", str(markdown))
    results = json.loads(out.read_text())["results"]
    assert {(r["K"], r["provider"]) for r in results} == {
        (k, p)
        for k in (1, 3)
        for p in ("vae_fast", "vae_fast dreg", "torch (repeat x)", "torch (expand x)")
    }
    for r in results:
        assert r["time"]["median_s"] > 0 and r["peak_bytes"] >= r["recon_bytes"]
        assert r["max_rel_diff_vs_torch"] < 1e-4  # the fused bound is plain torch's
        # The op alone: the recon gradient at least, measured for vae_fast's own rows.
        alone = r["op_alone_peak_bytes"]
        assert (alone >= r["recon_bytes"]) if r["provider"] == "vae_fast" else alone is None
    table = markdown.read_text()
    assert proc.stdout.startswith(table.rstrip("\n"))
    assert re.search(r"- K=3: speed [\d.]+x >= 3x: (met|NOT met); peak [\d.]+ x recon", table)


def test_overhead_quick():
    proc = _python("overhead.py", "--size", "16x32x4", "--rounds", "1", "--min-time", "0.05",
                   "--threads", "1")  # fmt: skip
    stages = re.findall(
        r"^\| ([\w.]+) \| [\d.]+ \([\d.]+–[\d.]+\) \| [\d.]+× \|$", proc.stdout, re.M
    )
    assert stages == ["kernel", "engine", "Function", "op", "vae_fast.elbo", "eager"]


def test_validation_quick():
    proc = _python("validation.py", "--sizes", "16x32x4", "--rounds", "1", "--min-time", "0.01",
                   "--threads", "1")  # fmt: skip
    assert re.search(r"^\| 16×32×4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \([\d.]+–[\d.]+\) \|$",
                     proc.stdout, re.M)  # fmt: skip


@pytest.mark.parametrize("name", ["ops_cpu", "train_cpu"])
def test_report_renders_committed_results(name, tmp_path):
    """bench/results/<name>.md is what bench/report.py makes of bench/results/<name>.json:
    the same tables, columns and target lines."""
    assert (
        _report(BENCH / "results" / f"{name}.json", tmp_path)
        == (BENCH / "results" / f"{name}.md").read_text()
    )


def test_report_targets_file(tmp_path):
    """Targets come from a file: none with --targets '', and one's own numbers otherwise."""
    results = BENCH / "results" / "ops_cpu.json"
    assert "### Targets" not in _report(results, tmp_path, "--targets", "")
    targets = tmp_path / "targets.json"
    check = {"check": "speed", "op": "elbo_bernoulli", "size": "8192x784x32"}
    check["at_least"] = {"eager": 1}
    targets.write_text(json.dumps({"ops": {"defaults": {"dtype": "float32", "mode": "full"},
                                           "checks": [check]}}))  # fmt: skip
    table = _report(results, tmp_path, "--targets", str(targets), "--run", "0")  # the headline run
    lines = table.split("### Targets in this run\n\n", 1)[1].strip().splitlines()
    assert len(lines) == 1
    met = r"- elbo_bernoulli fwd\+bwd 8192×784×32: [\d.]+× eager \(≥ 1×\): met"
    assert re.fullmatch(met, lines[0])


def test_help_shows_the_defaults():
    text = _python("ops.py", "--help").stdout
    assert "(default: 8192x784x32 4096x12288x128; --quick: 256x784x32)" in " ".join(text.split())
    assert "(default: 2.0; --quick: 0.05)" in " ".join(_python("train.py", "--help").stdout.split())
