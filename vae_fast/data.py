"""Datasets for the training command: digits, the user's arrays and IDX files, synthetic.

`load_dataset(spec)` returns float32 train and test tensors of shape (N, *event_shape)
and whether the values are probabilities in [0, 1] (to be binarized for a Bernoulli
likelihood) or real numbers (for a Gaussian one). Anything wrong with the input raises
`DataError` with a one-line message that names the file and what was expected.
`prepare(data, likelihood)` then gives the likelihood's view of it (`Prepared`).

How numbers are read (one rule per dtype, nothing guessed from the values):
- floats are taken as they are; bool is 0/1;
- uint8 is divided by 255 (pixels);
- other integer dtypes are refused: their full scale is unknown (0..255 pixels in an
  int64 array, 0..16 grey levels, counts...). Save them as floats, or pass
  ``scale=S`` (``--data-scale S``), which divides any data by S.
Data that a scaling rule leaves in a small corner of [0, 1] (uint8 holding only 0..16)
gets a `DataWarning`: it still loads.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vae_fast._data_files import DataError, one_line, read_arrays

__all__ = ["DataError", "DataWarning", "Dataset", "Prepared", "load_dataset", "prepare"]

# The train/test split of a single array is fixed (not --seed): every run of the
# same data is scored on the same test rows.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# A scaling rule that leaves every value below this fraction of its full scale warns.
SMALL_RANGE = 1 / 8


class DataWarning(UserWarning):
    """The data loads but looks unintended (e.g. uint8 pixels that only reach 16 of 255)."""


@dataclass(frozen=True)
class Dataset:
    """Train and test rows of one dataset, float32, shape (N, *event_shape)."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    binary: bool  # values are in [0, 1]: probabilities for a Bernoulli likelihood
    image_shape: tuple[int, int, int] | None  # (C, H, W) when rows are images
    reading: str = ""  # how the stored numbers became these values, e.g. "uint8 / 255"

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_dataset(spec: str, *, scale: float | None = None) -> Dataset:
    """Load ``digits``, ``synthetic:NxD``, or a path to .npz/.npy/IDX data (or a directory
    holding MNIST-style IDX files).

    Args:
        spec: what to load (see above).
        scale: divide a file's data by this (any dtype); None applies the dtype rule of
            the module docstring (uint8 / 255, other integers refused).
    """
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise DataError(f"--data-scale {scale}: must be positive and finite")
    if spec == "digits" or spec.startswith("synthetic:"):
        if scale is not None:
            raise DataError(
                f"--data-scale {scale:g}: --data {spec} is already in [0, 1]; the scale "
                "applies to .npz/.npy/IDX files"
            )
        return _digits() if spec == "digits" else _synthetic(spec)
    path = Path(spec)
    train, test = read_arrays(spec)
    return _dataset(path.stem or path.name, str(path), train, test, scale)


# --------------------------------------------------------------------------- sources


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the 'train' extra
        raise DataError(f"--data digits needs scikit-learn ({error})") from None
    # 8x8 grey levels 0..16, scaled to [0, 1]: probabilities of a pixel being on.
    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    train, test = _split(x)
    return Dataset("digits", train, test, binary=True, image_shape=(1, 8, 8), reading="0..16 / 16")


def _synthetic(spec: str) -> Dataset:
    m = re.fullmatch(r"synthetic:(\d+)[x×X*](\d+)", spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise DataError(
            f"--data {spec}: expected synthetic:NxD with positive N and D, e.g. synthetic:65536x784"
        )
    n, d = int(m.group(1)), int(m.group(2))
    # Probabilities from a random 16-dim latent model: data a VAE can learn something of.
    g = torch.Generator().manual_seed(SPLIT_SEED)
    n_test = max(1, n // 10)
    try:
        w = torch.randn(16, d, generator=g) / 2.0
        x = torch.sigmoid(torch.randn(n + n_test, 16, generator=g) @ w)
    except (RuntimeError, MemoryError) as error:  # the allocator's "can't allocate memory"
        gib = (n + n_test) * d * 4 / 2**30
        raise DataError(
            f"--data {spec}: cannot hold {n + n_test}x{d} float32 values ({gib:.3g} GiB): "
            f"{one_line(error)}"
        ) from None
    side = math.isqrt(d)
    image = (1, side, side) if side * side == d else None
    return Dataset(
        f"synthetic-{n}x{d}", x[:n], x[n:], binary=True, image_shape=image, reading="probabilities"
    )


# --------------------------------------------------------------------------- checks


def _event_layout(name: str, a: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """(N, D) rows, (N, H, W) grey images, (N, C, H, W) or (N, H, W, C) images."""
    if a.ndim == 2:
        side = math.isqrt(a.shape[1])
        return a, (1, side, side) if side * side == a.shape[1] else None
    if a.ndim == 3:
        return a[:, None], (1, *a.shape[1:])
    if a.ndim == 4:
        # Channels-last only where the second dim cannot be a channel count (e.g. 28).
        if a.shape[1] > 4 and a.shape[3] in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)  # channels-last to channels-first
        return a, tuple(a.shape[1:])
    raise DataError(
        f"{name}: array of shape {a.shape}; expected (N, features), (N, H, W) or (N, C, H, W)"
    )


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _as_float(
    name: str, a: np.ndarray, scale: float | None, *, warn: bool = True
) -> tuple[np.ndarray, bool, str]:
    """float32 values, whether they are probabilities, and how they were read (the dtype
    rules of the module docstring); `warn` about a small range (once per dataset)."""
    if a.dtype.kind not in "buif":  # (not "m": numpy counts timedelta64 as an integer)
        raise DataError(f"{name}: array of dtype {a.dtype}; expected numbers")
    integer = a.dtype.kind in "ui"
    if scale is None and a.dtype == np.bool_:
        return a.astype(np.float32), True, "bool as 0/1"
    if scale is None and integer and a.dtype != np.uint8:
        lo, hi = (_fmt(a.min()), _fmt(a.max())) if a.size else ("-", "-")
        example = f"--data-scale {hi}" if a.size and a.max() > 0 else "--data-scale 255"
        raise DataError(
            f"{name}: {a.dtype} data (values {lo}..{hi}); integers other than uint8 have no "
            f"fixed scale: save the data as floats, or pass --data-scale S to divide it by S "
            f"(e.g. {example})"
        )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"{name}: {bad} non-finite values (nan or inf); the data must be finite")
    divisor = _divisor(a.dtype, scale)
    # Divide in float64 where float32 would lose the values or the divisor first (int64,
    # float64 beyond float32's range, a scale of 1e39): only the result must fit float32.
    with np.errstate(over="ignore", under="ignore"):
        small = divisor is None or np.finfo(np.float32).tiny <= np.float32(divisor) < np.inf
    narrow = a.dtype.itemsize <= 2 or a.dtype == np.float32
    work = np.float32 if narrow and small else np.float64
    f = a.astype(work)
    if divisor is not None:
        with np.errstate(over="ignore"):
            f /= work(divisor)
    big = float(np.abs(f).max()) if f.size else 0.0
    overflow = big > float(np.finfo(np.float32).max)  # (inf too: a division that overflowed)
    underflow = work is np.float64 and 0 < big < float(np.finfo(np.float32).tiny)  # narrowed
    if overflow or underflow:
        # The way out from the stored values (--data-scale replaces a scale, it does not
        # compound one): the power of ten that brings them into [-1, 1].
        stored = float(np.abs(a.astype(np.float64)).max())
        divided = "" if divisor is None else f" divided by {_fmt(divisor)}"
        problem = (
            f"values as large as {big:.3g} overflow float32 (at most 3.4e+38)"
            if overflow
            else f"values at most {big:.3g} underflow float32 (every one would be 0 or denormal)"
        )
        raise DataError(
            f"{name}: the stored values (up to {stored:.3g}){divided}: {problem}; "
            f"pass --data-scale {_power_of_ten(stored):g} (it divides)"
        )
    f = f.astype(np.float32, copy=False)
    if divisor is None:
        reading = f"{a.dtype} as is"
    else:
        rule = f"{a.dtype} / {_fmt(divisor)}"
        reading = rule if scale is None else f"{rule} (--data-scale)"
        if warn and a.size and a.dtype != np.bool_ and big < SMALL_RANGE:
            top = float(np.abs(a.astype(np.float64)).max())  # (abs of int8 -128 wraps)
            what = (
                "uint8 is divided by 255"
                if scale is None
                else f"--data-scale {_fmt(divisor)} divides by {_fmt(divisor)}"
            )
            hint = (
                f"if {_fmt(top)} is the full scale, pass --data-scale {_fmt(top)}"
                if top > 0
                else "every value is 0"
            )
            warnings.warn(
                f"{name}: {a.dtype} values only reach {_fmt(top)} ({what}, so the data lies "
                f"in [{f.min():.3g}, {f.max():.3g}]); {hint}",
                DataWarning,
                stacklevel=2,
            )
    return f, bool(f.size) and float(f.min()) >= 0.0 and float(f.max()) <= 1.0, reading


def _divisor(dtype: np.dtype, scale: float | None) -> float | None:
    """What stored numbers of `dtype` are divided by: --data-scale, else 255 for uint8."""
    return scale if scale is not None else (255.0 if dtype == np.uint8 else None)


def _power_of_ten(v: float) -> float:
    """The power of ten at or above |v|: a divisor that brings v into [-1, 1] (1e308 for
    the values above it, which float64's 1e309 cannot hold)."""
    return 10.0 ** min(math.ceil(math.log10(v)), 308) if v > 0 else 1.0


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = math.ceil(TEST_FRACTION * x.shape[0])
    return x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous()


def _dataset(
    name: str, where: str, train: np.ndarray, test: np.ndarray | None, scale: float | None
) -> Dataset:
    stored_train = train.dtype
    train, image = _event_layout(where, train)
    train, binary, reading = _as_float(where, train, scale)
    if train.shape[0] < 2:
        raise DataError(f"{where}: {train.shape[0]} rows; need at least 2")
    if math.prod(train.shape[1:]) == 0:
        raise DataError(f"{where}: rows of shape {train.shape[1:]} hold no features")
    x = torch.from_numpy(np.ascontiguousarray(train))
    if test is None:
        x_train, x_test = _split(x)
        # At least 2 rows to train on: a Gaussian's scale is a standard deviation over them.
        if x_train.shape[0] < 2:
            raise DataError(
                f"{where}: {x.shape[0]} rows leave {x_train.shape[0]} to train on after the "
                f"test split takes {x_test.shape[0]}; need at least 2"
            )
    else:
        stored = (stored_train, test.dtype)
        test, _ = _event_layout(f"{where} (test)", test)
        test, test_binary, test_reading = _as_float(f"{where} (test)", test, scale, warn=False)
        # Different rules (floats as they are, uint8 / 255) put train and test on
        # different scales, unless both come out as probabilities anyway (bool, uint8).
        on_one_scale = _divisor(stored[0], scale) == _divisor(stored[1], scale)
        if not on_one_scale and not (binary and test_binary):
            raise DataError(
                f"{where}: the training rows are read as {reading} but the test rows as "
                f"{test_reading}, so the two would not be on one scale; store them alike"
            )
        if test.shape[0] < 1:
            raise DataError(f"{where}: the test array has no rows")
        if test.shape[1:] != train.shape[1:]:
            raise DataError(
                f"{where}: test rows have shape {test.shape[1:]} but training rows "
                f"{train.shape[1:]}; they must match"
            )
        binary = binary and test_binary
        x_train, x_test = x, torch.from_numpy(np.ascontiguousarray(test))
    return Dataset(name, x_train, x_test, binary=binary, image_shape=image, reading=reading)


# --------------------------------------------------------------------------- the likelihood's view


@dataclass(frozen=True)
class Prepared:
    """The data as the model sees it, plus how to map results back to the data's units."""

    train: torch.Tensor  # probabilities (Bernoulli) or standardized values (Gaussian)
    test: torch.Tensor  # binarized once (Bernoulli) or standardized (Gaussian)
    test_shown: torch.Tensor  # the test rows in data units, for the reconstruction picture
    likelihood: str  # "bernoulli" or "gaussian" ("auto" resolved)
    shift: torch.Tensor | float = 0.0
    scale: torch.Tensor | float = 1.0
    log_jacobian: float = 0.0  # sum(log scale): nats per row added to losses in data units


def prepare(data: Dataset, likelihood: str, label: str | None = None) -> Prepared:
    """The view of `data` for `likelihood` ("auto", "bernoulli" or "gaussian"): Bernoulli
    takes probabilities (the test set binarized once), Gaussian standardized values.
    `label` names the data in errors (``--data X``)."""
    label = label or data.name
    if likelihood == "auto":
        likelihood = "bernoulli" if data.binary else "gaussian"
    if likelihood == "bernoulli":
        if not data.binary:
            raise DataError(
                f"--likelihood bernoulli: {data.name} has values outside [0, 1]; "
                "use --likelihood gaussian"
            )
        # The test set is binarized once, with a fixed seed, so every run is scored alike.
        g = torch.Generator().manual_seed(1)
        test = torch.bernoulli(data.test, generator=g)
        # The picture shows the binarized test rows: what the model is scored on.
        return Prepared(data.train, test, test, "bernoulli")
    shift = data.train.mean(0)
    std = data.train.std(0)
    # Constant features would get a zero scale: leave those unscaled.
    scale = torch.where(std > 1e-6 * float(std.max().clamp_min(1e-30)), std, torch.ones_like(std))
    train, test = (data.train - shift) / scale, (data.test - shift) / scale
    # Finite float32 data near float32's limit (say ±3e38) overflows the mean or the
    # standard deviation: the run would train on nan. Refuse it, with the way out.
    if not all(bool(t.isfinite().all()) for t in (shift, scale, train, test)):
        big = max(float(data.train.abs().max()), float(data.test.abs().max()))
        raise DataError(
            f"--data {label}: values as large as {big:.3g} overflow float32 when standardized "
            f"for the Gaussian likelihood (the mean or standard deviation is not finite); "
            f"divide them, e.g. with --data-scale {_power_of_ten(big):g}"
        )
    return Prepared(train, test, data.test, "gaussian", shift, scale, float(scale.log().sum()))
