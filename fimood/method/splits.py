"""The one split of fit rows into fit and calibration rows, by a hash of each row's id.

`fimood fit` (the pipeline's reduce), `fimood evaluate` (grouped densities) and `fimood study` all
use it, so a row lands on the same side everywhere, whatever the order or batching it comes in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def split_hash(ids: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per row id, independent of the seed hash. Shape (n,)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, person=b"fimood-calib").digest(), "little")
            / 2**64
            for i in ids
        ],
        dtype=np.float64,
    )


def calibration_rows(ids: Sequence[str], calibration_fraction: float) -> np.ndarray:
    """True for the rows held out to calibrate (their hash is below the fraction). Shape (n,)."""
    return split_hash(ids) < calibration_fraction
