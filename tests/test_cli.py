"""The training command's contract with its user, one test per promise.

- Image-shaped data (N, H, W) trains with the MLP and the conv model, and its pictures
  come out in the data's image shape (they crashed for the MLP).
- Integer data is read by a stated rule per dtype: uint8 / 255; other integer dtypes are
  refused unless --data-scale says what to divide by; a scale that leaves the data in a
  small corner of [0, 1] warns (one line) and still trains.
- A loss that becomes nan stops the run at once with exit status 1 and one line, and the
  checkpoint on disk keeps the last good (finite) weights.
- Finite data too large for float32 statistics (±3e38) is refused, naming the data.
- metrics.jsonl is strict JSON: nan/inf are written as null.
- --resume from an empty, truncated, garbage or foreign checkpoint is a one-line error
  that names the file.
- A .npy (or .npz) file that is not one says so.
- ConvVAE(channels=()) is a ValueError about `channels`.
- Ctrl-C prints where --resume continues and exits with 130.
- The picture grids part their cells with one-pixel neutral lines, written unresampled.
- The run starts with one line saying what it chose.
- The KL warm-up shows in the progress bar.

The rule behind the error tests: a user mistake is exit status 2 and exactly one line
on stderr, without a traceback. Runs are in-process and tiny (a few steps of a small
model); Ctrl-C and divergence are simulated by replacing the training step.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vae_fast.train.loop as loop
from vae_fast import _plots
from vae_fast.data import load_dataset
from vae_fast.nn import ConvVAE
from vae_fast.train import build_parser, run

SMALL = [
    "--latent-dim",
    "4",
    "--hidden",
    "32,16",
    "--batch-size",
    "32",
    "--no-progress",
    "--threads",
    "1",
    "--eval-samples",
    "0",
]


def cli(capsys, backend: str, *argv: str) -> tuple[int, str, str]:
    """Run the command in-process: (exit status, stdout, stderr)."""
    try:
        run([*argv, "--backend", backend])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line of stderr (asserting that there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def strict_json(line: str) -> dict:
    """json.loads that refuses the NaN/Infinity tokens Python's json writes by default."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def images(tmp_path: Path, name: str, a: np.ndarray) -> str:
    path = tmp_path / name
    np.save(path, a)
    return str(path)


# --------------------------------------------------------------------------- 1. image data


def test_image_shaped_data_trains_with_either_model_and_makes_pictures(
    tmp_path, capsys, vae_backend
):
    rng = np.random.default_rng(0)
    pixels = images(tmp_path, "i64.npy", rng.integers(0, 256, (96, 8, 8)).astype(np.int64))
    grey = images(tmp_path, "f16.npy", rng.integers(0, 17, (96, 8, 8)).astype(np.float32))
    conv = ["--model", "conv", "--channels", "4"]
    runs = [
        ([pixels, "--data-scale", "255"], "bernoulli", "mlp"),
        ([pixels, "--data-scale", "255", *conv], "bernoulli", "conv"),
        ([grey], "gaussian", "mlp"),  # 0..16 floats: real values, flat MLP rows
        ([grey, *conv], "gaussian", "conv"),
    ]
    for i, (data, likelihood, model) in enumerate(runs):
        out = tmp_path / f"run{i}"
        argv = ["--data", *data, "--out", str(out), "--steps", "3", *SMALL]
        code, stdout, err = cli(capsys, vae_backend, *argv)
        assert code == 0, (data, err)
        assert f"likelihood {likelihood}" in stdout and f"model {model}" in stdout
        for name in ("samples.png", "reconstructions.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG", (data, name)


# --------------------------------------------------------------------------- 2. integer dtypes


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint16])
def test_integers_other_than_uint8_need_a_scale(tmp_path, capsys, vae_backend, dtype):
    path = images(tmp_path, "ints.npy", np.arange(64 * 4).reshape(64, 4).astype(dtype) % 100)
    code, _, err = cli(capsys, vae_backend, "--data", path, *SMALL)
    assert code == 2
    line = one_line(err)
    assert path in line and np.dtype(dtype).name in line
    assert "--data-scale" in line and "floats" in line


def test_uint8_is_divided_by_255_and_data_scale_divides_by_s(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 6)).astype(np.uint8)
    a[0, 0] = 255
    d = load_dataset(images(tmp_path, "u8.npy", a))
    assert d.binary and float(d.train.max()) == 1.0 and d.reading == "uint8 / 255"
    d = load_dataset(images(tmp_path, "i64.npy", a.astype(np.int64) * 4), scale=1020.0)
    assert d.binary and float(d.train.max()) == 1.0 and "--data-scale" in d.reading
    # The scale applies to floats too (the way out for values too large for float32).
    d = load_dataset(images(tmp_path, "f.npy", a.astype(np.float64) * 1e300), scale=1e300)
    assert float(d.train.max()) == pytest.approx(255.0)
    # A scale beyond float32's range still divides (it is not rounded to inf first).
    d = load_dataset(images(tmp_path, "f32.npy", a.astype(np.float32) * 1e36), scale=1e39)
    assert float(d.train.max()) == pytest.approx(0.255)


def test_small_range_warns_in_one_line_and_still_trains(tmp_path, capsys, vae_backend):
    # uint8 that only holds 0..16 (like scikit-learn's digits): /255 leaves [0, 0.063].
    rng = np.random.default_rng(0)
    path = images(tmp_path, "u8.npy", rng.integers(0, 17, (96, 8, 8)).astype(np.uint8))
    argv = ["--data", path, "--out", str(tmp_path / "out"), "--steps", "2", *SMALL]
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 0
    line = one_line(err)
    assert line.startswith("vae-fast-train: warning: ") and path in line
    assert "only reach 16" in line and "--data-scale 16" in line
    # Saying the scale silences it.
    code, _, err = cli(capsys, vae_backend, *argv, "--data-scale", "16", "--overwrite")
    assert code == 0 and err == ""


# --------------------------------------------------------------------------- 3. nan loss


def _step_that_diverges(monkeypatch, at_step: int) -> list[int]:
    """Replace the training step: from `at_step` on the weights and the loss are nan, as
    after a step too large. Returns the steps that ran."""
    real = loop.train_step
    ran: list[int] = []

    def step(trainer, xb, step, **kw):
        ran.append(step)
        loss = real(trainer, xb, step, **kw)
        if step >= at_step:
            with torch.no_grad():
                for p in trainer.parameters():
                    p.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "train_step", step)
    return ran


def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, vae_backend, monkeypatch
):
    # digits with batch 32: 44 steps an epoch. Epoch 1 is checkpointed, then step 50
    # (in epoch 2) diverges.
    ran = _step_that_diverges(monkeypatch, at_step=50)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--epochs", "5", "--checkpoint-every", "1", *SMALL]
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 1
    line = one_line(err)
    assert "nan" in line and "diverged" in line and "--lr" in line
    assert f"{out / 'checkpoint.pt'} keeps epoch 1" in line
    # At once: the loss is read every 25 steps, not only at the end of an epoch.
    assert max(ran) < 50 + 25
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["objective"].values())
    records = [strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    # The exit status is documented.
    assert "1 the training diverged" in " ".join(build_parser().format_help().split())


def test_a_real_divergence_exits_1_without_nan_weights_on_disk(tmp_path, capsys, vae_backend):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1", "--lr", "1e4"]
    code, stdout, err = cli(capsys, vae_backend, *argv, *SMALL)
    assert code == 1, err
    assert "diverged" in one_line(err)
    assert "test ELBO" not in stdout
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", weights_only=True)["objective"]
        assert all(torch.isfinite(t).all() for t in state.values())


# --------------------------------------------------------------------------- 4. overflow


def test_data_too_large_for_float32_statistics_is_refused(tmp_path, capsys, vae_backend):
    big = np.full((64, 4), 3e38, np.float32)  # finite, but the mean and the std overflow
    big[::2] *= -1
    path = images(tmp_path, "big.npy", big)
    code, _, err = cli(capsys, vae_backend, "--data", path, *SMALL)
    assert code == 2
    line = one_line(err)
    assert path in line and "3e+38" in line and "overflow" in line and "--data-scale" in line
    # float64 beyond float32's range: refused when read, with the same way out.
    huge = images(tmp_path, "huge.npy", np.full((64, 4), 1e300))
    code, _, err = cli(capsys, vae_backend, "--data", huge, *SMALL)
    assert code == 2 and "overflow float32" in one_line(err) and huge in err
    # The suggested scale works.
    argv = ["--data", path, "--data-scale", "1e39", "--out", str(tmp_path / "o"), "--steps", "2"]
    code, _, err = cli(capsys, vae_backend, *argv, *SMALL)
    assert code == 0, err


def test_a_model_too_large_for_memory_is_a_usage_error(tmp_path, capsys, vae_backend):
    # Refused from its shapes before anything is allocated: one line, status 2 (not an
    # allocator traceback and status 1, which means "diverged").
    argv = ["--out", str(tmp_path), *SMALL, "--hidden", "100000000000"]  # (after SMALL's)
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 2
    line = one_line(err)
    assert "--hidden" in line and "parameters" in line and "GiB of cpu memory" in line


# --------------------------------------------------------------------------- 5. strict JSON


def test_metrics_jsonl_is_strict_json(tmp_path, capsys, vae_backend, monkeypatch):
    real = loop.evaluate

    def evaluate(*a, **kw):  # a test set the model scores as infinitely unlikely
        return dict(real(*a, **kw), test_loss=float("inf"), test_recon=float("nan"))

    monkeypatch.setattr(loop, "evaluate", evaluate)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, vae_backend, "--out", str(out), "--epochs", "2", *SMALL)
    assert code == 0, err
    records = [strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(r["test_loss"] is None and r["test_recon"] is None for r in records)
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # The per-epoch lines printed to the terminal are strict too.
    for line in stdout.splitlines():
        if line.startswith("{"):
            strict_json(line)
    # And so is the file rewritten by --resume.
    code, _, err = cli(capsys, vae_backend, "--out", str(out), "--epochs", "2", "--resume", *SMALL)
    assert code == 0, err
    for x in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(x)


# --------------------------------------------------------------------------- 6. checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("good")
    run(["--out", str(out), "--steps", "2", *SMALL])
    return (out / "checkpoint.pt").read_bytes()


_ALTERED = {
    "negative epoch": {"epoch": -1},
    "history of numbers": {"history": [1, 2]},
    "history shorter than the epochs": {"history": []},
}


def _damaged(kind: str, good: bytes, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00garbage, not a checkpoint\n" * 10)
    elif kind == "foreign dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "step": 3}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "other format":
        torch.save({"format": 7, "weights": torch.zeros(2)}, path)
    elif kind in _ALTERED:  # each entry of the right type, but a value no run writes
        torch.save({**torch.load(io.BytesIO(good), weights_only=True), **_ALTERED[kind]}, path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "empty"),
        ("truncated", "truncated or damaged"),
        ("garbage", "truncated or damaged"),
        ("foreign dict", "not a vae-fast-train checkpoint (it holds a dict with keys"),
        ("tensor", "not a vae-fast-train checkpoint (it holds a Tensor)"),
        ("other format", "checkpoint format 7"),
        ("negative epoch", "missing or bad: epoch -1"),
        ("history of numbers", "missing or bad: history"),
        ("history shorter than the epochs", "missing or bad: history"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(
    tmp_path, capsys, vae_backend, good_checkpoint, kind, message
):
    _damaged(kind, good_checkpoint, tmp_path / "checkpoint.pt")
    argv = ["--out", str(tmp_path), "--steps", "2", "--resume", *SMALL]
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 2
    line = one_line(err)
    assert str(tmp_path / "checkpoint.pt") in line and message in line


# --------------------------------------------------------------------------- 7. not numpy


def test_a_file_that_is_not_numpy_says_so(tmp_path, capsys, vae_backend):
    (tmp_path / "text.npy").write_text("x,y\n1,2\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "zipped.npz", x=np.zeros((4, 2)))
    (tmp_path / "zipped.npy").write_bytes((tmp_path / "zipped.npz").read_bytes())
    np.save(tmp_path / "plain.npy", np.zeros((4, 2)))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [
        ("text.npy", "is not a .npy file"),
        ("empty.npy", "is not a .npy file (it is empty)"),
        ("zipped.npy", "is a .npz archive"),
        ("plain.npz", "is a .npy file"),
        ("text.npz", "is not a .npz file"),
    ]
    for name, message in cases:
        code, _, err = cli(capsys, vae_backend, "--data", str(tmp_path / name), *SMALL)
        assert code == 2, name
        line = one_line(err)
        assert str(tmp_path / name) in line and message in line, line
        assert "pickle" not in line


# --------------------------------------------------------------------------- 8. ConvVAE


@pytest.mark.parametrize("channels", [(), (8, 0)])
def test_convvae_validates_channels(channels):
    with pytest.raises(ValueError, match="channels"):
        ConvVAE((1, 8, 8), 4, channels=channels)


# --------------------------------------------------------------------------- 9. Ctrl-C


def _step_interrupted_at(monkeypatch, at_step: int) -> None:
    real = loop.train_step

    def step(trainer, xb, step, **kw):
        if step == at_step:
            raise KeyboardInterrupt
        return real(trainer, xb, step, **kw)

    monkeypatch.setattr(loop, "train_step", step)


def test_ctrl_c_says_where_resume_continues(tmp_path, capsys, vae_backend, monkeypatch):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--epochs", "4", "--checkpoint-every", "2", *SMALL]
    # 44 steps an epoch: step 140 is in epoch 4; the last checkpoint holds epoch 2.
    _step_interrupted_at(monkeypatch, 140)
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 130
    assert one_line(err) == "vae-fast-train: interrupted; `--resume` continues from epoch 2"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    code, _, err = cli(capsys, vae_backend, *argv, "--resume")
    assert code == 0, err
    epochs = [strict_json(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_ctrl_c_before_the_first_checkpoint(tmp_path, capsys, vae_backend, monkeypatch):
    _step_interrupted_at(monkeypatch, 3)
    code, _, err = cli(capsys, vae_backend, "--out", str(tmp_path), "--epochs", "2", *SMALL)
    assert code == 130
    assert "interrupted before the first checkpoint" in one_line(err)


def test_an_out_that_holds_a_run_needs_resume_or_overwrite(tmp_path, capsys, vae_backend):
    # Forgetting --resume after a Ctrl-C would start over and overwrite the checkpoint.
    argv = ["--out", str(tmp_path), "--steps", "2", *SMALL]
    assert cli(capsys, vae_backend, *argv)[0] == 0
    code, _, err = cli(capsys, vae_backend, *argv)
    assert code == 2
    assert "holds a run (checkpoint.pt); continue it with --resume" in one_line(err)
    code, _, err = cli(capsys, vae_backend, *argv, "--overwrite")
    assert code == 0, err
    code, _, err = cli(capsys, vae_backend, *argv, "--overwrite", "--resume")
    assert code == 2 and "pick one" in one_line(err)


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, capsys, vae_backend, monkeypatch):
    # A new run that diverges before its first checkpoint must not leave the old run's
    # checkpoint behind, to be resumed or refused as if it were this run's.
    argv = ["--out", str(tmp_path), "--steps", "2", *SMALL]
    assert cli(capsys, vae_backend, *argv)[0] == 0
    assert (tmp_path / "checkpoint.pt").exists()
    _step_that_diverges(monkeypatch, at_step=0)
    code, _, err = cli(capsys, vae_backend, *argv, "--overwrite")
    assert code == 1 and "wrote no checkpoint" in one_line(err)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resume_refuses_what_changes_the_arithmetic(tmp_path, capsys, vae_backend):
    # Mixed precision and the shards of a step (processes x --accumulate) change the
    # numbers: a resumed run would match no straight run.
    argv = ["--out", str(tmp_path), "--epochs", "2", "--stop-after", "1", *SMALL]
    assert cli(capsys, vae_backend, *argv)[0] == 0
    code, _, err = cli(capsys, vae_backend, *argv, "--resume", "--amp", "bf16")
    assert code == 2 and "written with --amp none, this run has bf16" in one_line(err)
    code, _, err = cli(capsys, vae_backend, *argv, "--resume", "--accumulate", "2")
    assert code == 2 and "1 shards per step (processes x --accumulate), this run has 2" in (
        one_line(err)
    )


def test_resume_past_stop_after_says_nothing_was_trained(tmp_path, capsys, vae_backend):
    argv = ["--out", str(tmp_path), "--epochs", "3", *SMALL]
    assert cli(capsys, vae_backend, *argv, "--stop-after", "2")[0] == 0
    code, out, err = cli(capsys, vae_backend, *argv, "--resume", "--stop-after", "1")
    assert code == 0, err
    assert "the checkpoint is already at epoch 2 of 3, past --stop-after 1: nothing trained" in out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_usage_errors_come_from_rank_0_only(capsys, vae_backend, monkeypatch):
    # Under torchrun every rank parses the same options: one message, not one per rank.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = cli(capsys, vae_backend, "--lr", "-1", *SMALL)
    assert code == 2 and err == ""
    monkeypatch.setenv("RANK", "0")
    code, _, err = cli(capsys, vae_backend, "--lr", "-1", *SMALL)
    assert code == 2 and "--lr" in one_line(err)
    # A stray RANK without a launch (WORLD_SIZE unset, or RANK empty) is one process.
    monkeypatch.delenv("WORLD_SIZE")
    for rank in ("1", ""):
        monkeypatch.setenv("RANK", rank)
        code, _, err = cli(capsys, vae_backend, "--lr", "-1", *SMALL)
        assert code == 2 and "--lr" in one_line(err)


# --------------------------------------------------------------------------- 10. pictures


def test_picture_grid_has_one_pixel_neutral_separators(tmp_path):
    import matplotlib.image

    # 12 white 8x8 images, 4 columns: every pixel that is not white is a separator.
    ones = torch.ones(12, 1, 8, 8)
    rgb = _plots.grid_rgb(ones, ncol=4)
    h, w = rgb.shape[:2]
    white = (rgb == 1.0).all(-1)
    for line, n in ((white[h // 2 - 2], 4), (white[:, 5], 3)):  # across cells, both ways
        gaps = np.flatnonzero(~line)
        assert len(gaps) == n - 1, gaps  # one pixel between neighbouring cells
        assert np.all(np.diff(gaps) > 1)  # each gap is one pixel wide
    sep = rgb[~white]
    assert np.allclose(sep, sep[:, :1]) and np.allclose(sep, _plots.SEPARATOR)  # grey, not blue
    assert (white.sum() / white.size) > 0.9  # the cells, not the bars, fill the picture
    # save_grid writes that array pixel for pixel (no resampling that would thicken lines).
    path = _plots.save_grid(ones, tmp_path / "g.png", "twelve", ncol=4)
    png = matplotlib.image.imread(path)[..., :3]
    x0 = (png.shape[1] - w) // 2
    np.testing.assert_allclose(png[-h:, x0 : x0 + w], rgb, atol=1 / 255)


# --------------------------------------------------------------------------- 11-12. output


def test_startup_line_says_what_the_run_chose(tmp_path, capsys, vae_backend):
    argv = ["--out", str(tmp_path), "--steps", "2", *SMALL]
    code, stdout, err = cli(capsys, vae_backend, *argv)
    assert code == 0, err
    first = stdout.splitlines()[0]
    for part in (
        "data digits (1437 train + 360 test rows of 1x8x8",
        "likelihood bernoulli (auto: values in [0, 1])",
        "model mlp hidden 32,16 latent 4",
        "device cpu",
        "1 thread",
        "batch 32",
        "lr 0.0015 (--lr 0.003 at batch 128, sqrt scaling)",
    ):
        assert part in first, (part, first)


def test_kl_warmup_shows_in_the_progress_bar(tmp_path, capsys, vae_backend):
    argv = [*SMALL, "--out", str(tmp_path), "--steps", "30", "--progress"]
    code, _, err = cli(capsys, vae_backend, *argv, "--kl-warmup-steps", "1000")
    assert code == 0
    assert "beta=0.03" in err  # 30 of 1000 warm-up steps: the KL weight is 0.03
    code, _, err = cli(capsys, vae_backend, *argv, "--kl-warmup-steps", "0", "--overwrite")
    assert code == 0
    assert "loss=" in err and "beta=" not in err  # no warm-up: nothing to explain


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "transformer"], "invalid choice: 'transformer'"),
        (["--data-scale", "0"], "must be positive"),
        (["--data", "digits", "--data-scale", "16"], "already in [0, 1]"),
    ],
)
def test_usage_errors_are_one_line(capsys, vae_backend, argv, message):
    code, _, err = cli(capsys, vae_backend, *argv, *SMALL)
    assert code == 2
    assert message in one_line(err)
