"""The fit reduce: streams feature batches into mergeable statistics and a bounded calibration sample.

The pipeline's fit pass feeds it from Ray; the study feeds it in process, so its detectors are the
ones `fimood fit` builds.

Memory stays O(features + max_calibration_rows) whatever the number of rows streamed through it.
"""

from __future__ import annotations

import numpy as np

from fimood.method.baselines import TypicalityTest
from fimood.method.detector import GradNormDetector
from fimood.method.scoring import DEFAULT_RULE
from fimood.method.splits import split_hash
from fimood.method.statistics import FeatureStats


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
        self._hashes: list[np.ndarray] = [np.zeros(0)]
        self._features: list[np.ndarray] = [np.zeros((0, n_features))]
        self._pending_rows = 0

    def add(self, ids: list[str], log_sq_norms: np.ndarray, nll: np.ndarray) -> None:
        """Add a batch of decodable rows: ids (n,), features (n, L), NLL (n,)."""
        hashes = split_hash(ids)
        calibration = hashes < self.calibration_fraction
        self.stats = self.stats.update(log_sq_norms[~calibration])
        self.nll_sum += float(np.sum(nll[~calibration]))
        self.nll_count += int((~calibration).sum())
        self._hashes.append(hashes[calibration])
        self._features.append(log_sq_norms[calibration])
        self._pending_rows += int(calibration.sum())
        if self._pending_rows > 2 * self.max_calibration_rows:  # trim now and then, not on every batch
            self._trim()

    def _trim(self) -> None:
        """Keep the `max_calibration_rows` calibration rows with the smallest hashes."""
        hashes, features = np.concatenate(self._hashes), np.concatenate(self._features)
        order = np.argsort(hashes, kind="stable")[: self.max_calibration_rows]
        self._hashes, self._features = [hashes[order]], [features[order]]
        self._pending_rows = len(order)

    def finish(self, false_positive_rate: float, rule: str = DEFAULT_RULE) -> tuple[GradNormDetector, TypicalityTest]:
        """The fitted per-row detector and the Typicality baseline."""
        self._trim()
        calibration = self._features[0]
        if self.stats.count < 2 or len(calibration) == 0:
            raise ValueError(
                f"need at least 2 fit rows and 1 calibration row, got {self.stats.count} and "
                f"{len(calibration)}; add rows or change calibration_fraction"
            )
        detector = GradNormDetector(rule=rule, false_positive_rate=false_positive_rate).fit_stats(
            self.stats, calibration
        )
        return detector, TypicalityTest.from_entropy(self.nll_sum / self.nll_count)
