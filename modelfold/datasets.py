"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download at run time).

Images are zero-padded from 28x28 to 32x32 (2 pixels each side, so the CIFAR-style
reference models of :mod:`modelfold.zoo` apply unchanged) and normalized with the
train-set mean/std of the padded images (:data:`FMNIST_MEAN`, :data:`FMNIST_STD`).
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["FMNIST_MEAN", "FMNIST_STD", "fashion_mnist", "fashion_mnist_dir", "fashion_mnist_loader"]

#: Mean / std of the 60k train images after scaling to [0, 1] and zero-padding to 32x32.
FMNIST_MEAN: float = 0.2190
FMNIST_STD: float = 0.3318

_DEBIAN_PACKAGE = "dataset-fashion-mnist"
_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def fashion_mnist_dir() -> Path:
    """Directory holding the four ``*-ubyte.gz`` files of the Debian package.

    Asks ``dpkg -L dataset-fashion-mnist`` first and falls back to
    ``/usr/share/datasets/fashion-mnist``; raises :class:`FileNotFoundError` if neither has them.
    """
    wanted = _FILES["train"][0]
    try:
        listing = subprocess.run(
            ["dpkg", "-L", _DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        p = Path(line.strip())
        if p.name == wanted and p.is_file():
            return p.parent
    if all((_DEFAULT_DIR / f).is_file() for pair in _FILES.values() for f in pair):
        return _DEFAULT_DIR
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in `dpkg -L {_DEBIAN_PACKAGE}` and {_DEFAULT_DIR}); "
        f"install it with `apt-get install {_DEBIAN_PACKAGE}`."
    )


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim != expected_ndim:
        raise ValueError(f"{path}: not an IDX uint8 file with {expected_ndim} dimensions (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of a Fashion-MNIST split (``"train"`` or ``"test"``).

    ``images`` is float32 of shape (N, 1, 32, 32), zero-padded and normalized with
    :data:`FMNIST_MEAN` / :data:`FMNIST_STD`; ``labels`` is int64 of shape (N,).
    Results are cached in-process; do not modify the returned tensors in place.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split not in _CACHE:
        root = fashion_mnist_dir()
        img_file, lbl_file = _FILES[split]
        images = torch.from_numpy(_read_idx(root / img_file, 3).copy())
        labels = torch.from_numpy(_read_idx(root / lbl_file, 1).astype(np.int64))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels for {split!r}")
        x = images.to(torch.float32).div_(255.0)
        x = torch.nn.functional.pad(x, (2, 2, 2, 2)).unsqueeze(1)
        x = x.sub_(FMNIST_MEAN).div_(FMNIST_STD)
        _CACHE[split] = (x, labels)
    return _CACHE[split]


def fashion_mnist_loader(
    split: str = "train",
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """A :class:`DataLoader` over :func:`fashion_mnist` (optionally only the first ``limit`` samples).

    Shuffling uses a ``torch.Generator`` seeded with ``seed``, so the order is reproducible.
    """
    x, y = fashion_mnist(split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)
