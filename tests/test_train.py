"""The training command: it learns, backends agree, --resume is exact, two gloo processes
match one, and bad input gets a one-line error. Runs are in-process where possible
(one interpreter start costs seconds on a small CI machine)."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_fast.data import DataError, load_dataset
from vae_fast.train import build_parser, run

ROOT = Path(__file__).resolve().parents[1]
# A small model and batch: a digits epoch is 22 steps of a few milliseconds.
SMALL = [
    "--latent-dim",
    "4",
    "--hidden",
    "64,32",
    "--batch-size",
    "64",
    "--lr",
    "3e-3",
    "--no-progress",
    "--threads",
    "1",  # a small model on a shared 2-core machine: one thread is faster, and steady
]
TIMING = {"samples_per_s", "epoch_time_s", "log_likelihood_time_s"}


def train(out: Path, *args: str, backend: str) -> list[dict]:
    run(["--out", str(out), "--backend", backend, *SMALL, *args])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["objective"]


# --------------------------------------------------------------------------- learning


def test_short_run_on_digits_lowers_the_test_loss(tmp_path, vae_backend, capsys):
    out = tmp_path / "run"
    records = train(out, "--epochs", "6", "--eval-samples", "50", backend=vae_backend)
    assert [r["epoch"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"epoch", "train_loss", "test_loss", "samples_per_s"} <= r.keys()
        assert r["samples_per_s"] > 0
    first, last = records[0], records[-1]
    # An untrained model scores ~44 nats and per-pixel marginals ~27.5 on the test digits.
    assert last["test_loss"] < first["test_loss"] - 1.0 and last["test_loss"] < 29.0
    assert last["log_likelihood_samples"] == 50
    assert -last["test_loss"] <= last["test_log_likelihood"] < 0  # the IW bound is tighter
    printed = capsys.readouterr().out
    for name in ("samples.png", "reconstructions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / name) in printed
    assert "test log-likelihood (importance-weighted, k=50)" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "metrics.jsonl",
        "reconstructions.png",
        "samples.png",
    ]  # no temporary files left behind


@pytest.mark.fused_only
def test_fused_and_reference_give_the_same_curve(tmp_path, reference_draws_like_fused):
    args = ("--epochs", "3", "--eval-samples", "50")
    fused = train(tmp_path / "fused", *args, backend="fused")
    ref = train(tmp_path / "reference", *args, backend="reference")
    for f, r in zip(fused, ref):
        for key in ("train_loss", "test_loss", "test_kl"):
            assert f[key] == pytest.approx(r[key], rel=1e-4), (f["epoch"], key)
    assert fused[-1]["test_log_likelihood"] == pytest.approx(
        ref[-1]["test_log_likelihood"], rel=1e-4
    )


def test_resume_after_a_stop_equals_a_straight_run(tmp_path, vae_backend, capsys):
    args = ("--epochs", "4", "--eval-samples", "20", "--checkpoint-every", "1")
    straight = train(tmp_path / "straight", *args, backend=vae_backend)
    stopped = train(tmp_path / "resumed", *args, "--stop-after", "2", backend=vae_backend)
    assert [r["epoch"] for r in stopped] == [1, 2]
    assert "continue with --resume" in capsys.readouterr().out
    torch.manual_seed(123)  # resuming must not depend on the RNG state it starts with
    resumed = train(tmp_path / "resumed", *args, "--resume", backend=vae_backend)
    assert without_timing(resumed) == without_timing(straight)
    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_options(tmp_path, vae_backend, capsys):
    train(tmp_path / "run", "--steps", "2", "--eval-samples", "0", backend=vae_backend)
    with pytest.raises(SystemExit):
        train(tmp_path / "run", "--steps", "2", "--lr", "1e-2", "--resume", backend=vae_backend)
    assert "was written with --lr 0.003, this run has 0.01" in capsys.readouterr().err


@pytest.mark.slow  # two processes under torchrun
def test_two_gloo_processes_match_one(tmp_path, vae_backend):
    """A 2-process gloo run equals one process that splits the same global batch the same
    way (--accumulate 2): the same rows, the same noise per shard, averaged gradients."""
    args = ["--epochs", "2", "--eval-samples", "0", "--backend", vae_backend, *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vae_fast.train",
        "--out",
        str(tmp_path / "ddp"),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one thread (SMALL), like each worker: the same kernels and summation order
    run(["--out", str(tmp_path / "one"), "--accumulate", "2", *args])
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp) == len(one) == 2
    for d, o in zip(ddp, one):
        for key in ("train_loss", "test_loss"):
            assert d[key] == pytest.approx(o[key], rel=1e-5), (d["epoch"], key)
    a, b = state(tmp_path / "ddp"), state(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- options


def test_more_models_and_options_run(tmp_path, vae_backend):
    # conv model, bf16 autocast, a DataLoader worker, KL warm-up, sqrt lr scaling
    records = train(
        tmp_path / "conv",
        "--model",
        "conv",
        "--channels",
        "8,16",
        "--amp",
        "bf16",
        "--workers",
        "1",
        "--kl-warmup-steps",
        "10",
        "--lr-scaling",
        "sqrt",
        "--steps",
        "30",
        "--eval-samples",
        "10",
        backend=vae_backend,
    )
    assert len(records) == 2 and records[-1]["step"] == 30  # the second epoch is cut short
    assert np.isfinite(records[-1]["test_log_likelihood"])


def test_gaussian_likelihood_on_real_data(tmp_path, vae_backend, capsys):
    # Real values (not in [0, 1]) get the Gaussian likelihood with a learned per-feature
    # variance; losses are in nats of the original units (scaling the data by 10 shifts
    # the log-likelihood by -10 features * log 10).
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 2))
    x = z @ rng.normal(size=(2, 10)) + 0.1 * rng.normal(size=(400, 10)) + 3.0
    results = []
    for scale in (1.0, 10.0):
        np.save(tmp_path / f"real{scale}.npy", (x * scale).astype(np.float32))
        out = tmp_path / f"out{scale}"
        records = train(
            out,
            "--data",
            str(tmp_path / f"real{scale}.npy"),
            "--epochs",
            "10",
            "--eval-samples",
            "20",
            backend=vae_backend,
        )
        results.append(records[-1])
        obs = state(out)["loss.obs_logvar"]
        assert obs.shape == (10,) and not torch.all(obs == 0)  # learned
    assert "nats per example" in capsys.readouterr().out
    shift = results[1]["test_log_likelihood"] - results[0]["test_log_likelihood"]
    assert shift == pytest.approx(-10 * np.log(10.0), abs=1e-3)
    for r in results:  # the terms are in the same (data) units as the loss they add up to
        assert r["test_loss"] == pytest.approx(r["test_recon"] + r["test_kl"], rel=1e-9)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


# --------------------------------------------------------------------------- data


def _write_idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + a.astype(np.uint8).tobytes())


def test_idx_files_and_directories(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (30, 6, 5)), rng.integers(0, 256, (7, 6, 5))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (30,)))
    for spec in (tmp_path, tmp_path / "train-images-idx3-ubyte.gz"):
        data = load_dataset(str(spec))
        assert data.binary and data.image_shape == (1, 6, 5)
        assert data.train.shape == (30, 1, 6, 5) and data.test.shape == (7, 1, 6, 5)
        np.testing.assert_allclose(data.test[:, 0].numpy(), test_x / 255.0, rtol=1e-6)


def test_npz_npy_and_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "pair.npz", x_train=rng.random((20, 3, 4, 4)), x_test=rng.random((5, 3, 4, 4))
    )
    d = load_dataset(str(tmp_path / "pair.npz"))
    assert d.binary and d.image_shape == (3, 4, 4) and (len(d.train), len(d.test)) == (20, 5)
    np.save(tmp_path / "one.npy", rng.normal(size=(50, 7)))
    d = load_dataset(str(tmp_path / "one.npy"))
    assert not d.binary and d.image_shape is None and (len(d.train), len(d.test)) == (40, 10)
    d = load_dataset("synthetic:100x16")
    assert d.train.shape == (100, 16) and d.test.shape == (10, 16) and d.image_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="synthetic:NxD"):  # DataError: callers catch ValueError
        load_dataset("synthetic:3")
    d = load_dataset("digits")
    assert (len(d.train), len(d.test)) == (1437, 360) and float(d.train.max()) == 1.0
    assert torch.equal(load_dataset("digits").test, d.test)  # the split is fixed


def test_idx_test_file_found_compressed_or_not(tmp_path):
    # A gzipped training file beside a plain t10k file (or the reverse): the test rows
    # are that file's, not a split of the training rows.
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 4, 4)))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 4, 4)))
    data = load_dataset(str(tmp_path))
    assert (len(data.train), len(data.test)) == (30, 7)


def _damaged_files(tmp: Path) -> list[tuple[Path, str]]:
    """Files whose reading raised Python exceptions other than a DataError."""
    rng = np.random.default_rng(0)
    np.savez(tmp / "good.npz", x=rng.random((8, 4)).astype(np.float32))
    raw = bytearray((tmp / "good.npz").read_bytes())
    raw[200] ^= 0xFF  # a flipped byte inside the stored member (x.npy): a bad CRC
    (tmp / "crc.npz").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp / "raw.npz", "w") as z:
        z.writestr("x", b"not a .npy file")  # numpy hands such a member back as bytes
    gz = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]))
    (tmp / "bad-idx.gz").write_bytes(gz[:10] + b"\xff" * 8 + gz[18:])  # an invalid deflate block
    np.save(tmp / "delta.npy", np.arange(8, dtype="m8[s]").reshape(4, 2))
    return [
        (tmp / "crc.npz", "cannot read as .npz (Bad CRC-32"),
        (tmp / "raw.npz", "its member 'x' is not a .npy array"),
        (tmp / "bad-idx.gz", "cannot read ("),
        (tmp / "delta.npy", "array of dtype timedelta64[s]; expected numbers"),
    ]


def test_damaged_or_odd_files_are_one_line_data_errors(tmp_path):
    for path, message in _damaged_files(tmp_path):
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset(str(path))
    with pytest.raises(DataError, match="cannot hold"):
        load_dataset("synthetic:1000000000000x784")  # 3 PiB: the allocator refuses


def test_data_misread_before_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    # A test array under a name the loader does not pair would have been ignored.
    np.savez(tmp_path / "keys.npz", x=rng.random((8, 4)), x_test=rng.random((2, 4)))
    # Train and test stored so that they are read on different scales.
    np.savez(
        tmp_path / "mixed.npz",
        x_train=rng.random((8, 4)).astype(np.float32) * 255,
        x_test=rng.integers(0, 256, (2, 4)).astype(np.uint8),
    )
    # float64 values that float32 flushes to zero (they trained as all-zero data).
    np.save(tmp_path / "tiny.npy", rng.random((8, 4)) * 1e-50)
    np.savez(tmp_path / "no_test_rows.npz", x_train=rng.random((8, 4)), x_test=np.zeros((0, 4)))
    cases = [
        ("keys.npz", "holds arrays ['x', 'x_test']"),
        ("mixed.npz", "read as float32 as is but the test rows as uint8 / 255"),
        ("tiny.npy", "underflow float32"),
        ("no_test_rows.npz", "the test array has no rows"),
    ]
    for name, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset(str(tmp_path / name))
    # A data scale so small that dividing overflows: said so, not blamed on the data.
    # The way out is worked from the stored values (--data-scale replaces a scale):
    # following it loads the data, whichever way the given scale was off.
    np.save(tmp_path / "ok.npy", rng.random((8, 4)).astype(np.float32) + 0.5)
    np.save(tmp_path / "u8.npy", rng.integers(0, 256, (8, 4)).astype(np.uint8))
    np.save(tmp_path / "f64max.npy", np.full((8, 4), 1.7e308))  # its power of ten is no float
    for name, scale, problem in [
        ("f64max.npy", None, "overflow float32"),
        ("ok.npy", 1e-39, "overflow float32"),
        ("u8.npy", 1e-320, "overflow float32"),  # to inf: a float64 division
        ("u8.npy", 1e-40, "overflow float32"),
        ("u8.npy", 1e43, "underflow float32"),
    ]:
        with pytest.raises(DataError, match=problem) as caught:
            load_dataset(str(tmp_path / name), scale=scale)
        advice = re.search(r"pass --data-scale (\S+) \(it divides\)", str(caught.value))
        assert advice is not None, caught.value
        load_dataset(str(tmp_path / name), scale=float(advice.group(1)))


def test_data_that_loads_as_it_should(tmp_path):
    rng = np.random.default_rng(0)
    # bool and uint8 both become probabilities: one scale, whatever the two rules.
    np.savez(
        tmp_path / "bool_uint8.npz",
        x_train=rng.random((8, 4)) < 0.5,
        x_test=rng.integers(0, 256, (2, 4)).astype(np.uint8),
    )
    # float32 values near float32's smallest normal number are kept as they are.
    np.save(tmp_path / "tiny32.npy", (rng.random((8, 4)) * 1e-38).astype(np.float32))
    # Labels beside images: "test_labels" is not the images' test set.
    np.savez(
        tmp_path / "labels.npz",
        images=rng.random((8, 4)),
        labels=np.arange(8),
        test_labels=np.arange(2),
    )
    for name, rows in (("bool_uint8.npz", (8, 2)), ("tiny32.npy", (6, 2)), ("labels.npz", (6, 2))):
        data = load_dataset(str(tmp_path / name))
        assert (len(data.train), len(data.test)) == rows, name
    # A damaged file beside the IDX pair is passed over, not fatal.
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 4, 4)))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 4, 4)))
    (tmp_path / "fashion-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0" * 64)[:20])
    data = load_dataset(str(tmp_path))
    assert (len(data.train), len(data.test)) == (30, 7)


def test_channels_first_images_stay_channels_first(tmp_path):
    # (N, 2, 5, 3) is 2 channels of 5x3, as the README promises; only a second dim that
    # cannot be a channel count (e.g. (N, 28, 28, 3)) is read as channels-last.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "nchw.npy", rng.random((10, 2, 5, 3)).astype(np.float32))
    np.save(tmp_path / "nhwc.npy", rng.random((10, 6, 5, 3)).astype(np.float32))
    assert load_dataset(str(tmp_path / "nchw.npy")).image_shape == (2, 5, 3)
    assert load_dataset(str(tmp_path / "nhwc.npy")).image_shape == (3, 6, 5)


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    np.save(tmp / "flat.npy", np.zeros(10))
    np.save(tmp / "nan.npy", np.array([[0.5, np.nan], [0.1, 0.2], [0.3, 0.4]]))
    np.save(tmp / "real.npy", np.linspace(-3, 3, 40).reshape(20, 2))
    np.savez(tmp / "keys.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    np.savez(tmp / "mismatch.npz", train=np.zeros((4, 2)), test=np.zeros((4, 3)))
    (tmp / "junk.npy").write_bytes(b"not an array")
    (tmp / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 9]))
    idx = gzip.compress(bytes([0, 0, 8, 2, 0, 0, 0, 16, 0, 0, 0, 4]) + bytes(64))
    (tmp / "cut.gz").write_bytes(idx[: len(idx) // 2])  # a download cut short
    np.save(tmp / "no_features.npy", np.zeros((20, 0)))
    # Empty uint8 arrays (whose small-range warning read their min and max first).
    np.save(tmp / "empty_u8.npy", np.zeros((0, 16), np.uint8))
    np.save(tmp / "no_features_u8.npy", np.zeros((10, 0), np.uint8))
    np.save(tmp / "two_rows.npy", np.array([[0.1, 0.5], [0.3, 0.2]]))  # 1 left after the split
    (tmp / "a_file").write_text("")
    return [
        (["--data", str(tmp / "missing.npz")], "no such file"),
        (["--data", str(tmp / "flat.npy")], "expected (N, features)"),
        (["--data", str(tmp / "nan.npy")], "non-finite"),
        (["--data", str(tmp / "keys.npz")], "holds arrays ['a', 'b']"),
        (["--data", str(tmp / "mismatch.npz")], "must match"),
        (["--data", str(tmp / "junk.npy")], "cannot read as .npy"),
        (["--data", str(tmp / "train-images-idx3-ubyte")], "IDX header is truncated"),
        (["--data", "synthetic:0x5"], "synthetic:NxD"),
        (["--data", str(tmp / "real.npy"), "--likelihood", "bernoulli"], "outside [0, 1]"),
        (
            ["--data", str(tmp / "real.npy"), "--model", "conv", "--batch-size", "4"],
            "are not images",
        ),
        (["--model", "transformer"], "invalid choice: 'transformer'"),
        (["--hidden", "64,0"], "expected positive integers"),
        (["--lr", "nan"], "must be positive and finite"),
        (["--batch-size", "5000"], "exceeds the 1437 training rows"),
        (["--batch-size", "63", "--accumulate", "2"], "must be divisible"),
        (["--resume", "--out", str(tmp / "nothing")], "no checkpoint"),
        (["--resume"], "needs the --out DIR"),
        (["--data", str(tmp / "cut.gz")], "cannot read (Compressed file ended"),
        (["--data", str(tmp / "no_features.npy")], "hold no features"),
        (["--data", str(tmp / "empty_u8.npy")], "0 rows; need at least 2"),
        (["--data", str(tmp / "no_features_u8.npy")], "hold no features"),
        (["--data", str(tmp / "two_rows.npy"), "--batch-size", "1"], "leave 1 to train on"),
        (["--out", str(tmp / "a_file"), "--epochs", "1"], "cannot create the directory"),
        (["--seed", str(2**64)], "must be less than 2147483648"),
    ]


def test_bad_input_gets_a_one_line_error(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            run([*argv, "--backend", "reference", "--no-progress"])
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("vae-fast-train: error: ") and message in last, (argv, err)
        assert "Traceback" not in err


def test_bad_input_under_torchrun_is_reported_by_rank_0_only(monkeypatch, capsys):
    # Every rank finds the same bad data; one line in all, from rank 0, and status 2 on each.
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, reported in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            run(["--data", "synthetic:0x5", "--backend", "reference", "--no-progress"])
        assert exit_info.value.code == 2
        assert ("synthetic:NxD" in capsys.readouterr().err) == reported, rank


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vae_fast.train", "--data", str(tmp_path / "mnist.npz")],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--data {tmp_path / 'mnist.npz'}: no such file or directory (expected 'digits', "
            "'synthetic:NxD', or a .npz/.npy/IDX file)"
        )
    )


# A test set that is not a whole number of picture rows (13 rows, 10 to a row) or is
# smaller than one row (4): every row of test images is followed by a row of their own
# reconstructions, never wrapped into the next.
@pytest.mark.parametrize("test_rows, want_ncol, want_pairs", [(13, 10, 10), (4, 4, 4)])
def test_reconstruction_picture_pairs_whole_rows(monkeypatch, tmp_path, test_rows, want_ncol,
                                                 want_pairs):  # fmt: skip
    from vae_fast.data import Dataset, prepare
    from vae_fast.nn import VAE
    from vae_fast.train import evaluate

    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(20, 16, generator=g), torch.rand(test_rows, 16, generator=g)
    data = Dataset("tiny", train, test, binary=True, image_shape=(1, 4, 4))
    objective = torch.nn.Module()
    objective.model = VAE(16, 2, hidden=(8,))
    grids = {}

    def capture(images, path, title, *, ncol, vmin, vmax):
        grids[path.name] = (images, ncol)
        return path

    monkeypatch.setattr(evaluate._plots, "save_grid", capture)
    prep = prepare(data, "bernoulli")
    evaluate.pictures(objective, prep, data, tmp_path, 0, torch.device("cpu"))
    images, ncol = grids["reconstructions.png"]
    assert ncol == want_ncol and images.shape[0] == 2 * want_pairs
    # The test rows as the model is scored on them: binarized once.
    shown = prep.test[:want_pairs].reshape(-1, 1, 4, 4)
    assert set(shown.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(images.reshape(-1, 2, ncol, 1, 4, 4)[:, 0].reshape(-1, 1, 4, 4), shown)
