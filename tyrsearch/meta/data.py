"""Fashion-MNIST as tensors, read from the Debian package `dataset-fashion-mnist`.

The package installs the original idx files (gzip) under /usr/share/datasets/fashion-mnist/; they are
parsed with numpy (no pickles). `$TYRSEARCH_FASHION_MNIST` (or the `root` argument) points elsewhere.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tyrsearch.errors import UserError

PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV = "TYRSEARCH_FASHION_MNIST"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLITS = tuple(FILES)
# per-pixel statistics of the training images, so that inputs are roughly zero-mean, unit-variance
MEAN, STD = 0.2860, 0.3530


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # [N, 1, 28, 28] float32, normalised
    labels: torch.Tensor  # [N] int64 in [0, 10)

    def __len__(self) -> int:
        return len(self.labels)


def root_dir(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(ENV) or DEFAULT_ROOT)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file: 2 zero bytes, a dtype code (0x08: uint8), the rank, big-endian uint32 dims, the data."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file; reinstall the Debian package {PACKAGE}")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def load(split: str, *, limit: int | None = None, root: str | Path | None = None) -> Split:
    """The `split` ("train": 60k images, "test": 10k), optionally only its first `limit` images."""
    if split not in FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: choose one of {', '.join(SPLITS)}")
    folder = root_dir(root)
    paths = [folder / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"Fashion-MNIST not found ({', '.join(missing)} missing in {folder}): install the Debian "
                        f"package {PACKAGE} (apt-get install {PACKAGE}) or set ${ENV} to a folder with its files")
    images, labels = (_read_idx(p) for p in paths)
    images, labels = images[:limit], labels[:limit]
    pixels = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)  # [N, 1, 28, 28]
    return Split(images=(pixels - MEAN) / STD, labels=torch.from_numpy(labels.astype(np.int64)))
