"""Reading the arrays of a --data path: .npz, .npy, MNIST-style IDX files (gzipped or
not) and directories of them, with every failure a one-line `DataError` that names the
file. (What the numbers mean is `vae_fast.data`'s business.)"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_NPZ_PAIRS = (("x_train", "x_test"), ("X_train", "X_test"), ("train", "test"))
_NPZ_SINGLE = ("x", "X", "data", "images")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip
# What reading a damaged or oversized file raises: a one-line DataError, never a traceback.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError)


class DataError(ValueError):
    """The data cannot be used; the message is one line, fit for a command-line error."""


def read_arrays(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The training array of the file or directory `spec`, and its test array if it has one."""
    path = Path(spec)
    try:
        exists = bool(spec) and path.exists()
        is_dir = exists and path.is_dir()
    except OSError as error:  # e.g. a file in a directory that cannot be entered
        raise DataError(f"--data {spec}: cannot read ({one_line(error)})") from None
    if not exists:
        raise DataError(
            f"--data {spec or repr(spec)}: no such file or directory (expected 'digits', "
            "'synthetic:NxD', or a .npz/.npy/IDX file)"
        )
    suffix = path.suffix.lower()
    if is_dir:
        train, test = _idx_directory(path)
    elif suffix == ".npz":
        train, test = _npz(path)
    elif suffix == ".npy":
        train, test = _load_npy(path), None
    elif _looks_like_idx(path):
        train, test = _read_idx(path), _idx_test_sibling(path)
    else:
        raise DataError(f"{path}: unknown file type; expected .npz, .npy or an IDX file")
    return train, test


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(_NPY_MAGIC))
    except OSError as error:
        raise DataError(f"{path}: cannot read ({one_line(error)})") from None


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    # np.load sniffs the format itself and falls back to pickle, whose complaint
    # ("pickled data") would mislead: check the magic bytes first.
    head = _magic(path)
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{path}: cannot read as .npz: it is a .npy file; name it .npy")
    if not head.startswith(_ZIP_MAGICS):
        raise DataError(
            f"{path}: cannot read as .npz: the file is not a .npz file "
            f"({'it is empty' if not head else 'not a zip archive'})"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            for a, b in _NPZ_PAIRS:
                if a in z and b in z:
                    return _npz_array(path, z, a), _npz_array(path, z, b)
            for k in _NPZ_SINGLE:
                if k in z:
                    # Its test array under a name of its own would be ignored: refuse.
                    pair = {f"{k}_test", f"test_{k}", "test", "x_test", "X_test"} & set(keys)
                    if pair:
                        raise DataError(
                            f"{path}: holds arrays {keys}; {k!r} and {sorted(pair)[0]!r} look "
                            "like a train/test pair: name them 'x_train' and 'x_test'"
                        )
                    return _npz_array(path, z, k), None
            if len(keys) == 1:
                return _npz_array(path, z, keys[0]), None
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read as .npz ({one_line(error)})") from None
    raise DataError(
        f"{path}: holds arrays {keys}; expected 'x_train' and 'x_test', 'train' and 'test', "
        "or a single array"
    )


def _npz_array(path: Path, z: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    a = z[key]
    if not isinstance(a, np.ndarray):  # a member that is not a .npy file comes as bytes
        raise DataError(f"{path}: cannot read as .npz: its member {key!r} is not a .npy array")
    return a


def _load_npy(path: Path) -> np.ndarray:
    head = _magic(path)
    if head.startswith(_ZIP_MAGICS):
        raise DataError(f"{path}: cannot read as .npy: it is a .npz archive; name it .npz")
    if head != _NPY_MAGIC:
        why = "it is empty" if not head else r"it does not start with numpy's \x93NUMPY"
        raise DataError(f"{path}: cannot read as .npy: the file is not a .npy file ({why})")
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read as .npy ({one_line(error)})") from None


def _looks_like_idx(path: Path) -> bool:
    try:
        with _open(path) as f:
            head = f.read(4)
    except (PermissionError, EOFError, zlib.error) as error:  # unreadable, a damaged .gz
        raise DataError(f"{path}: cannot read ({one_line(error)})") from None
    except OSError:  # e.g. a .gz that is not gzip
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES


def _readable_idx(path: Path) -> bool:
    """A directory's IDX candidate; an unreadable or damaged one is not, so that it does
    not stop the files beside it from loading."""
    try:
        return _looks_like_idx(path)
    except DataError:
        return False


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0 0 type ndim, big-endian dims, then data."""
    try:
        with _open(path) as f:
            raw = f.read()
    except _READ_ERRORS as error:  # EOFError, zlib.error: a truncated or damaged .gz
        raise DataError(f"{path}: cannot read ({one_line(error)})") from None
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
        name = path.name.replace("train", word)
        # Compressed or not, whichever the training file is.
        for candidate in (name, name.removesuffix(".gz"), name.removesuffix(".gz") + ".gz"):
            sibling = path.with_name(candidate)
            if sibling.exists():
                return _read_idx(sibling)
    return None


def _idx_directory(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        names = list(path.iterdir())
    except OSError as error:
        raise DataError(f"{path}: cannot read ({one_line(error)})") from None
    images = sorted(p for p in names if "images" in p.name and _readable_idx(p))
    train = [p for p in images if "train" in p.name]
    if not train:
        raise DataError(
            f"{path}: no IDX image file with 'train' in its name (e.g. train-images-idx3-ubyte)"
        )
    return _read_idx(train[0]), _idx_test_sibling(train[0])
