"""Datasets for the training command: digits, the user's arrays and IDX files, synthetic.

`load_dataset(spec)` returns float32 train and test tensors of shape (N, *event_shape)
and whether the values are probabilities in [0, 1] (to be binarized for a Bernoulli
likelihood) or real numbers (for a Gaussian one). Anything wrong with the input raises
`DataError` with a one-line message that names the file and what was expected.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load_dataset"]

# The train/test split of a single array is fixed (not --seed): every run of the
# same data is scored on the same test rows.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_NPZ_PAIRS = (("x_train", "x_test"), ("X_train", "X_test"), ("train", "test"))
_NPZ_SINGLE = ("x", "X", "data", "images")


class DataError(ValueError):
    """The data cannot be used; the message is one line, fit for a command-line error."""


@dataclass(frozen=True)
class Dataset:
    """Train and test rows of one dataset, float32, shape (N, *event_shape)."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    binary: bool  # values are in [0, 1]: probabilities for a Bernoulli likelihood
    image_shape: tuple[int, int, int] | None  # (C, H, W) when rows are images

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_dataset(spec: str) -> Dataset:
    """Load ``digits``, ``synthetic:NxD``, or a path to .npz/.npy/IDX data (or a directory
    holding MNIST-style IDX files)."""
    if spec == "digits":
        return _digits()
    if spec.startswith("synthetic:"):
        return _synthetic(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"--data {spec}: no such file or directory (expected 'digits', 'synthetic:NxD', "
            "or a .npz/.npy/IDX file)"
        )
    if path.is_dir():
        train, test = _idx_directory(path)
    elif path.suffix == ".npz":
        train, test = _npz(path)
    elif path.suffix == ".npy":
        train, test = _load_npy(path), None
    elif _looks_like_idx(path):
        train, test = _read_idx(path), _idx_test_sibling(path)
    else:
        raise DataError(f"{path}: unknown file type; expected .npz, .npy or an IDX file")
    return _prepare(path.stem or path.name, str(path), train, test)


# --------------------------------------------------------------------------- sources


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the 'train' extra
        raise DataError(f"--data digits needs scikit-learn ({error})") from None
    # 8x8 grey levels 0..16, scaled to [0, 1]: probabilities of a pixel being on.
    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    train, test = _split(x)
    return Dataset("digits", train, test, binary=True, image_shape=(1, 8, 8))


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
    w = torch.randn(16, d, generator=g) / 2.0
    x = torch.sigmoid(torch.randn(n + n_test, 16, generator=g) @ w)
    side = math.isqrt(d)
    image = (1, side, side) if side * side == d else None
    return Dataset(f"synthetic-{n}x{d}", x[:n], x[n:], binary=True, image_shape=image)


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            for a, b in _NPZ_PAIRS:
                if a in z and b in z:
                    return z[a], z[b]
            for k in _NPZ_SINGLE:
                if k in z:
                    return z[k], None
            if len(keys) == 1:
                return z[keys[0]], None
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read as .npz ({_one_line(error)})") from None
    raise DataError(
        f"{path}: holds arrays {keys}; expected 'x_train' and 'x_test', 'train' and 'test', "
        "or a single array"
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read as .npy ({_one_line(error)})") from None


def _looks_like_idx(path: Path) -> bool:
    try:
        with _open(path) as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0 0 type ndim, big-endian dims, then data."""
    try:
        with _open(path) as f:
            raw = f.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({_one_line(error)})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({count * dtype.itemsize} bytes) but the "
            f"file has {len(body)} bytes of data"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_test_sibling(path: Path) -> np.ndarray | None:
    """MNIST's test images sit next to the training ones: train-* -> t10k-* (or test-*)."""
    if "train" not in path.name:
        return None
    for word in ("t10k", "test"):
        sibling = path.with_name(path.name.replace("train", word))
        if sibling.exists():
            return _read_idx(sibling)
    return None


def _idx_directory(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    images = sorted(p for p in path.iterdir() if "images" in p.name and _looks_like_idx(p))
    train = [p for p in images if "train" in p.name]
    if not train:
        raise DataError(
            f"{path}: no IDX image file with 'train' in its name (e.g. train-images-idx3-ubyte)"
        )
    return _read_idx(train[0]), _idx_test_sibling(train[0])


# --------------------------------------------------------------------------- checks


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _event_layout(name: str, a: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """(N, D) rows, (N, H, W) grey images, (N, C, H, W) or (N, H, W, C) images."""
    if a.ndim == 2:
        side = math.isqrt(a.shape[1])
        return a, (1, side, side) if side * side == a.shape[1] else None
    if a.ndim == 3:
        return a[:, None], (1, *a.shape[1:])
    if a.ndim == 4:
        if a.shape[1] not in (1, 3, 4) and a.shape[3] in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)  # channels-last to channels-first
        return a, tuple(a.shape[1:])
    raise DataError(
        f"{name}: array of shape {a.shape}; expected (N, features), (N, H, W) or (N, C, H, W)"
    )


def _as_float(name: str, a: np.ndarray) -> tuple[np.ndarray, bool]:
    """float32 values and whether they are probabilities (bytes are scaled by 1/255)."""
    if a.dtype == np.bool_:
        return a.astype(np.float32), True
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{name}: array of dtype {a.dtype}; expected numbers")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0, True
    f = a.astype(np.float32)
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).sum())
        raise DataError(f"{name}: {bad} non-finite values (nan or inf); the data must be finite")
    return f, bool(f.size) and float(f.min()) >= 0.0 and float(f.max()) <= 1.0


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = math.ceil(TEST_FRACTION * x.shape[0])
    return x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous()


def _prepare(name: str, where: str, train: np.ndarray, test: np.ndarray | None) -> Dataset:
    train, image = _event_layout(where, train)
    train, binary = _as_float(where, train)
    if train.shape[0] < 2:
        raise DataError(f"{where}: {train.shape[0]} rows; need at least 2")
    x = torch.from_numpy(np.ascontiguousarray(train))
    if test is None:
        x_train, x_test = _split(x)
    else:
        test, _ = _event_layout(f"{where} (test)", test)
        test, test_binary = _as_float(f"{where} (test)", test)
        if test.shape[1:] != train.shape[1:] or test.shape[0] < 1:
            raise DataError(
                f"{where}: test rows have shape {test.shape[1:]} (n={test.shape[0]}) "
                f"but training rows {train.shape[1:]}; they must match"
            )
        binary = binary and test_binary
        x_train, x_test = x, torch.from_numpy(np.ascontiguousarray(test))
    return Dataset(name, x_train, x_test, binary=binary, image_shape=image)
