"""The id-hash splits of rows: fit and calibration rows, and the rows a model is trained on.

`fimood fit` (the pipeline's reduce), `fimood evaluate` (grouped densities) and `fimood study` all
use the calibration split, so a row lands on the same side everywhere, whatever the order or
batching it comes in. `fimood train --id-hash-range` selects its rows by a second, independent hash,
so a model trained on part of a table leaves the rest unseen, and `fimood fit` can tell which rows it
was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _id_hash(ids: Sequence[str], person: bytes) -> np.ndarray:
    digests = (hashlib.blake2b(i.encode(), digest_size=8, person=person).digest() for i in ids)
    return np.array([int.from_bytes(digest, "little") / 2**64 for digest in digests], dtype=np.float64)


def split_hash(ids: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per row id, independent of the seed hash. Shape (n,)."""
    return _id_hash(ids, b"fimood-calib")


def calibration_rows(ids: Sequence[str], calibration_fraction: float) -> np.ndarray:
    """True for the rows held out to calibrate (their hash is below the fraction). Shape (n,)."""
    return split_hash(ids) < calibration_fraction


def training_hash(ids: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per row id, independent of the calibration and seed hashes. Shape (n,)."""
    return _id_hash(ids, b"fimood-train")


def check_id_hash_range(id_hash_range: Sequence[float]) -> tuple[float, float]:
    """`(low, high)` as floats, or one error unless 0 <= low < high <= 1."""
    if len(id_hash_range) != 2 or not 0.0 <= id_hash_range[0] < id_hash_range[1] <= 1.0:
        raise ValueError(f"id_hash_range must be (low, high) with 0 <= low < high <= 1, got {tuple(id_hash_range)}")
    return float(id_hash_range[0]), float(id_hash_range[1])


def training_rows(ids: Sequence[str], id_hash_range: Sequence[float]) -> np.ndarray:
    """True for the rows whose training hash lies in [low, high). Shape (n,)."""
    low, high = check_id_hash_range(id_hash_range)
    hashes = training_hash(ids)
    return (hashes >= low) & (hashes < high)
