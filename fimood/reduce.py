"""The fit reduce: streams feature batches into mergeable statistics and a bounded calibration sample.

Memory stays O(features + max_calibration_rows) whatever the number of rows, so the same reduce
serves an in-process fit and a fit over a data lake streamed from Ray.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fimood.baselines import TypicalityTest
from fimood.density import FeatureStats
from fimood.detector import GradNormDetector


def split_hash(ids: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per row id, independent of the seed hash: it assigns rows to splits."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, person=b"fimood-calib").digest(), "little")
            / 2**64
            for i in ids
        ],
        dtype=np.float64,
    )


class FitReduce:
    """Accumulates the in-distribution fit from batches of (id, log-norm features, NLL) in any order.

    A row goes to calibration when its id hashes below `calibration_fraction`, else to the fit
    statistics. At most `max_calibration_rows` calibration rows are kept: those with the smallest
    hashes, so the sample does not depend on the order rows arrive in.
    """

    def __init__(self, n_features: int, calibration_fraction: float, max_calibration_rows: int = 100_000):
        self.calibration_fraction = calibration_fraction
        self.max_calibration_rows = max_calibration_rows
        self.stats = FeatureStats.empty(n_features)
        self.nll_sum, self.nll_count = 0.0, 0
        self._calibration_hashes = np.zeros(0)
        self._calibration_features = np.zeros((0, n_features))

    def add(self, ids: list[str], log_sq_norms: np.ndarray, nll: np.ndarray) -> None:
        """Add a batch of decodable rows: ids (n,), features (n, L), NLL (n,)."""
        hashes = split_hash(ids)
        calibration = hashes < self.calibration_fraction
        self.stats = self.stats.update(log_sq_norms[~calibration])
        self.nll_sum += float(np.sum(nll[~calibration]))
        self.nll_count += int((~calibration).sum())
        kept_hashes = np.concatenate([self._calibration_hashes, hashes[calibration]])
        kept_features = np.concatenate([self._calibration_features, log_sq_norms[calibration]])
        order = np.argsort(kept_hashes, kind="stable")[: self.max_calibration_rows]
        self._calibration_hashes, self._calibration_features = kept_hashes[order], kept_features[order]

    @property
    def calibration_features(self) -> np.ndarray:
        """(m, L) features of the calibration sample."""
        return self._calibration_features

    def finish(self, false_positive_rate: float) -> tuple[GradNormDetector, TypicalityTest]:
        """The fitted per-row detector and the Typicality baseline."""
        if self.stats.count < 2 or len(self._calibration_features) == 0:
            raise ValueError(
                f"need at least 2 fit rows and 1 calibration row, got {self.stats.count} and "
                f"{len(self._calibration_features)}; add rows or change calibration_fraction"
            )
        detector = GradNormDetector(false_positive_rate=false_positive_rate).fit_stats(
            self.stats, self._calibration_features
        )
        return detector, TypicalityTest.from_entropy(self.nll_sum / self.nll_count)
