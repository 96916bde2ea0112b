"""Markdown tables and plots of bench/ops.py's and bench/train.py's results, made from their
JSON alone (as Liger-Kernel's benchmark visualizer works from its results file), so that a
run can be rendered again, or compared, without running it.

    python bench/report.py bench/results/ops_cpu.json --markdown ops_cpu.md --plot ops_cpu.png
    python bench/report.py bench/results/train_cpu.json          # the tables on stdout
    python bench/report.py results.json --run -1 --targets my_targets.json

Under the tables each run is checked against the targets of bench/targets.json
(bench/targets.py). ops.py and train.py call `publish` for their --markdown and --plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (after the path set-up, so `python bench/report.py` works)
import targets as T  # noqa: E402
from _results import (  # noqa: E402
    MODE_TITLE,
    PEERS,
    ROOFS,
    SWEEPS,
    Case,
    cases,
    find,
    fmt_mib,
    load_runs,
    timed,
)

# --------------------------------------------------------------------------- formatting


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


def fmt_ratio_spread(r: float | None, spread: list[float] | None) -> str:
    """A ratio of medians, with the 20th-80th percentiles of the round-by-round ratio."""
    if r is None or not spread:
        return fmt_ratio(r)
    return f"{fmt_ratio(r)} ({spread[0]:.1f}–{spread[1]:.1f})"


def fmt_pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.0f}%"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _preamble(meta: dict, columns: str) -> list[str]:
    """The machine line, and the stand-in warning when vae_fast._C was not built."""
    cap = meta.get("vae_fast_cpu_capability")  # absent from older runs
    kernels = f"vae_fast CPU kernels {cap}, " if cap else ""
    out = [
        f"Machine: {meta['device_name']}, {meta['threads']} threads ({meta['cpu_cores']} cores), "
        f"{kernels}torch {meta['torch_version']}, vae_fast {meta['vae_fast_version']} "
        f"({meta['git_commit']}, backend: {meta['vae_fast_backend']}), {meta['date']}, "
        f"load average {meta.get('load_average_start')} → {meta.get('load_average_end')}",
        "",
    ]
    if meta["vae_fast_backend"] != "fused":
        out += [
            f"**vae_fast._C was not built: {columns} as a stand-in. These numbers say nothing "
            "about the fused kernels.**",
            "",
        ]
    return out


# --------------------------------------------------------------------------- ops.py's tables


def provider_titles(meta: dict) -> dict[str, str]:
    kind = "copy" if meta["device"] == "cuda" else "triad"
    label = "vae_fast" if meta["vae_fast_backend"] == "fused" else "vae_fast [reference stand-in]"
    return {
        "vae_fast": label,
        "vae_fast_inplace": "vae_fast, inplace_grad",
        "reference": "reference",
        "eager": "eager",
        "distributions": "torch.distributions",
        "compile": "torch.compile",
        "roof": f"roof ({kind})",
        "roof_alloc": f"{kind}, fresh out",
    }


def _peak_cell(rec: dict | None) -> str:
    if not rec or "peak_bytes" not in rec:
        return "–"
    return f"{fmt_mib(rec['peak_bytes'])} ({fmt_mib(rec.get('transient_bytes'))})"


def ops_markdown(run: dict, checks: list[str]) -> str:
    meta, records, providers = run["meta"], run["results"], run["config"]["providers"]
    titles = provider_titles(meta)
    peers = [p for p in providers if p in (*PEERS, "reference")]
    out = _preamble(meta, "the vae_fast column ran the reference (plain torch) backend")

    def time_row(case: Case) -> list[str]:
        mine = find(records, "vae_fast", **case.match())
        cells = [f"{case.size} {case.dtype}"]
        for p in providers:
            rec = find(records, p, **case.match())
            cells.append(fmt_ms(rec["median_s"]) if rec else "–")
        cells.append(f"{mine['gbps']:.3g}" if mine else "–")
        cells.append(fmt_pct(mine.get("frac_roof") if mine else None))
        speedup = mine.get("speedup") if mine else None
        spread = (mine.get("speedup_spread") or {}) if mine else {}
        cells += [
            fmt_ratio_spread(speedup.get(p), spread.get(p)) if speedup is not None else "–"
            for p in peers
        ]
        return cells

    time_header = (
        ["B×D×Z"]
        + [f"{titles[p]} ms" for p in providers]
        + ["vae_fast GB/s", "of roof"]
        + [f"vs {titles[p]}" for p in peers]
    )
    headline = cases(records, "sizes", op="elbo_bernoulli", mode="full")
    if headline:
        out += [f"### elbo (Bernoulli, mean), forward+backward, {meta['device']}", ""]
        out += [md_table(time_header, [time_row(c) for c in headline]), ""]

    rows = [[c.op, MODE_TITLE[c.mode], *time_row(c)] for c in cases(records, "sizes")]
    out += ["### Every op", "", md_table(["op", "pass", *time_header], rows), ""]

    mem_providers = [p for p in providers if p not in ROOFS]
    mem_rows = []
    for case in cases(records, "sizes", mode="full"):
        recs = {p: find(records, p, **case.match()) for p in mem_providers}
        if not any(r and "peak_bytes" in r for r in recs.values()):
            continue
        any_rec = next(r for r in recs.values() if r)
        mine, eager = recs.get("vae_fast"), recs.get("eager")
        ratio = None
        if mine and eager and mine.get("peak_bytes") and eager.get("peak_bytes"):
            ratio = eager["peak_bytes"] / mine["peak_bytes"]
        mem_rows.append(
            [case.op, f"{case.size} {case.dtype}", fmt_mib(any_rec["one_grad_bytes"])]
            + [_peak_cell(recs[p]) for p in mem_providers]
            + [fmt_ratio(ratio)]
        )
    if mem_rows:
        header = ["op", "B×D×Z", "one gradient", *(titles[p] for p in mem_providers)]
        out += [
            "### Peak extra memory of forward+backward, MiB (in brackets: the part freed "
            "by the end of the call; the rest is the gradients left in .grad)",
            "",
            md_table([*header, "eager / vae_fast"], mem_rows),
            "",
        ]

    for sweep in SWEEPS:
        in_sweep = [r for r in records if sweep.suite in r["suites"]]
        for op in dict.fromkeys(r["op"] for r in in_sweep):
            for mode in dict.fromkeys(r["mode"] for r in in_sweep):
                found = cases(records, sweep.suite, op=op, mode=mode)
                if not found:
                    continue
                found.sort(key=lambda c: (c.dtype, getattr(c, sweep.axis)))
                out += [f"### Scaling over {sweep.axis}: {op}, {MODE_TITLE[mode]}", ""]
                out += [md_table(time_header, [time_row(c) for c in found]), ""]
    if checks:
        out += ["### Targets in this run", "", *checks, ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- train.py's table


def _rate(rec: dict) -> str:
    if "samples_per_s" in rec:
        return f"{rec['samples_per_s']:,.0f}"
    return "error" if rec.get("error") else "–"


def train_markdown(run: dict, checks: list[str]) -> str:
    meta, records, modes = run["meta"], run["results"], run["config"]["modes"]
    fused_title = "fused" if meta["vae_fast_backend"] == "fused" else "fused [reference stand-in]"
    out = _preamble(meta, "the fused columns ran the reference backend")
    header = ["model", "batch"]
    for mode in modes:
        header += [
            f"{fused_title} {mode} samples/s",
            f"reference {mode} samples/s",
            f"{mode}: fused / reference",
            f"{mode}: loss share fused / ref",
        ]
    rows = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in records):
        row = [model, str(batch)]
        for mode in modes:
            get = {
                r["backend"]: r
                for r in records
                if r["model"] == model and r["batch"] == batch and r["mode"] == mode
            }
            f, r = get.get("fused", {}), get.get("reference", {})
            row += [
                _rate(f),
                _rate(r),
                fmt_ratio(f.get("speedup_vs_reference")),
                f"{fmt_pct(f.get('loss_fraction'))} / {fmt_pct(r.get('loss_fraction'))}",
            ]
        rows.append(row)
    out += ["### Training step (forward, loss, backward, Adam)", "", md_table(header, rows), ""]
    for line in checks:
        out += [line, ""]
    return "\n".join(out)


def markdown(run: dict, targets: dict | None = None) -> str:
    render = ops_markdown if run["kind"] == "ops" else train_markdown
    return render(run, T.check(run, targets))


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)


def _save(fig, run: dict, what: str, path: str) -> None:
    meta = run["meta"]
    fig.suptitle(
        f"vae_fast {what} on {meta['device_name']} (threads={meta['threads']}), "
        f"backend {meta['vae_fast_backend']}",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def ops_plot(run: dict, path: str) -> bool:
    """Time and GB/s against size over each sweep: a row pair per op, pass and dtype."""
    records, config = run["results"], run["config"]
    titles = provider_titles(run["meta"])
    panels = list(
        dict.fromkeys(
            (r["op"], r["mode"], r["dtype"])
            for r in records
            if {s.suite for s in SWEEPS} & set(r["suites"])
        )
    )
    if not panels:
        print("--plot: no sweep in this run, nothing to plot", file=sys.stderr)
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2 * len(panels), 2, figsize=(11, 4.2 * 2 * len(panels)), squeeze=False)
    for i, (op, mode, dtype) in enumerate(panels):
        for j, sweep in enumerate(SWEEPS):
            ax_t, ax_g = axes[2 * i][j], axes[2 * i + 1][j]
            for provider in config["providers"]:
                pts = sorted(
                    (r for r in timed(records, op=op, mode=mode, dtype=dtype, provider=provider)
                     if sweep.suite in r["suites"]),
                    key=lambda r: r[sweep.axis],
                )  # fmt: skip
                if not pts:
                    continue
                xs = [r[sweep.axis] for r in pts]
                med = [r["median_s"] * 1e3 for r in pts]
                lo = [m - r["p20_s"] * 1e3 for m, r in zip(med, pts)]
                hi = [r["p80_s"] * 1e3 - m for m, r in zip(med, pts)]
                style = {"roof": "--", "roof_alloc": ":"}.get(provider, "-")
                label = titles[provider]
                ax_t.errorbar(xs, med, yerr=[lo, hi], marker="o", ls=style, capsize=2, label=label)
                ax_g.plot(xs, [r["gbps"] for r in pts], marker="o", ls=style, label=label)
            fixed = ", ".join(
                f"{k}={config[f'sweep_{k.lower()}']}" for k in "BDZ" if k != sweep.axis
            )
            for ax, ylabel in ((ax_t, "median time (ms)"), (ax_g, "GB/s (ideal bytes / time)")):
                _log_axes(ax, sweep.label, ylabel, f"{op} {MODE_TITLE[mode]} {dtype}, {fixed}")
            if i == 0 and j == 0:
                ax_t.legend(fontsize=8)
    _save(fig, run, "ops", path)
    return True


def train_plot(run: dict, path: str) -> bool:
    """Samples/s against batch size, one panel per model, a line per backend and mode."""
    records = timed(run["results"])
    models = list(dict.fromkeys(r["model"] for r in records))
    if not models:
        print("--plot: no timed step in this run, nothing to plot", file=sys.stderr)
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in records if r["model"] == model]
        for backend, mode in dict.fromkeys((r["backend"], r["mode"]) for r in mine):
            pts = sorted(
                (r for r in mine if r["backend"] == backend and r["mode"] == mode),
                key=lambda r: r["batch"],
            )
            style = "-" if backend == "fused" else "--"
            xs, ys = [r["batch"] for r in pts], [r["samples_per_s"] for r in pts]
            ax.plot(xs, ys, marker="o", ls=style, label=f"{backend} {mode}")
        _log_axes(ax, "batch size", "samples/s", f"{model}, {run['config']['dtype']}")
        ax.legend(fontsize=8)
    _save(fig, run, "training step", path)
    return True


def plot(run: dict, path: str) -> bool:
    """Write the run's PNG; False (and a note) when it has nothing to plot."""
    return (ops_plot if run["kind"] == "ops" else train_plot)(run, path)


# --------------------------------------------------------------------------- output, CLI


def publish(run: dict, markdown_path: str | None = None, plot_path: str | None = None) -> None:
    """What ops.py and train.py do with a finished run besides its JSON: print the tables
    (checked against bench/targets.json), write them to `markdown_path`, plot to `plot_path`."""
    _emit(markdown(run, T.load()), markdown_path, quiet=False)
    if plot_path:
        plot(run, plot_path)


def _emit(text: str, path: str | None, quiet: bool) -> None:
    if not quiet:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_cli.HelpFormatter,
    )
    p.add_argument("json", nargs="+", help="results of bench/ops.py or bench/train.py")
    p.add_argument(
        "--run",
        type=int,
        nargs="+",
        help="which runs of each file, by index, -1 the last (default: every run)",
    )
    p.add_argument("--markdown", help="write the tables here (default: print them)")
    p.add_argument("--plot", help="PNG of the last run chosen (ops: the sweeps; train: samples/s)")
    p.add_argument("--targets", help="the targets file, '' for none (default: bench/targets.json)")
    args = p.parse_args(argv)
    runs = []
    for path in args.json:
        found = load_runs(path)
        runs += [found[i] for i in args.run] if args.run is not None else found
    if not runs:
        raise SystemExit("no run in " + ", ".join(args.json))
    targets = T.load(T.DEFAULT if args.targets is None else args.targets)
    _emit("\n".join(markdown(run, targets) for run in runs), args.markdown, bool(args.markdown))
    if args.plot and not plot(runs[-1], args.plot):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
