"""The fit reduce: streams feature batches into mergeable statistics and a bounded calibration sample.

The pipeline's fit pass feeds it from Ray; the study feeds it in process, so its detectors are the
ones `fimood fit` builds.

Memory stays within `FitReduce.memory_bound_bytes` whatever the number of rows streamed through it:
O(features² + features × max_calibration_rows), measured by `fimood benchmark-reduce`. Reduces of
disjoint rows merge (`merge`) into the reduce of all of them, so Ray tasks can each reduce some rows
and merge their partials (`to_bytes`, `from_bytes`: plain arrays, never pickles).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from fimood.method.baselines import TypicalityTest
from fimood.method.detector import DetectorSettings, GradNormDetector
from fimood.method.scoring import DEFAULT_RULE
from fimood.method.splits import split_hash, training_rows
from fimood.method.statistics import FeatureStats


class FitReduce:
    """Accumulates the in-distribution fit from batches of (id, log-norm features, NLL) in any order.

    A row goes to calibration when its id hashes below `calibration_fraction`, else to the fit
    statistics. At most `max_calibration_rows` calibration rows are kept: those with the smallest
    hashes, so the sample does not depend on the order rows arrive in. Calibration rows past the cap
    join the fit statistics instead (merging is order-free, so the fit does not depend on the order
    either, and no row is wasted). Once the cap is reached, a row hashing above every kept one goes
    there on arrival; rows that might belong wait in a short queue (a quarter of the cap) until the
    kept set is trimmed again.

    With `training_id_hash_range` (the model's recorded range, when the rows come from its training
    table), it counts the rows whose training hash lies in it: rows the model was trained on.
    """

    def __init__(
        self,
        n_features: int,
        calibration_fraction: float,
        max_calibration_rows: int = 100_000,
        training_id_hash_range: tuple[float, float] | None = None,
    ):
        if max_calibration_rows < 1:
            raise ValueError(f"max_calibration_rows must be at least 1, got {max_calibration_rows}")
        self.calibration_fraction = calibration_fraction
        self.max_calibration_rows = max_calibration_rows
        self.training_id_hash_range = training_id_hash_range
        self.training_rows = 0  # rows added that the model was trained on
        self.stats = FeatureStats.empty(n_features)
        self.nll_sum, self.nll_count = 0.0, 0
        self._hashes: list[np.ndarray] = [np.zeros(0)]
        self._features: list[np.ndarray] = [np.zeros((0, n_features))]
        self._nll: list[np.ndarray] = [np.zeros(0)]
        self._pending_rows = 0
        self._largest_kept_hash = np.inf  # once the cap is reached: rows hashing at or above it never enter

    @staticmethod
    def memory_bound_bytes(n_features: int, max_calibration_rows: int, batch_rows: int) -> int:
        """What the reduce holds at its peak, for float64 features: the kept calibration rows and their
        queue, both copied once while trimming, and the statistics' few L × L matrices."""
        queued = max_calibration_rows + max_calibration_rows // 4 + batch_rows
        return 8 * ((n_features + 1) * (2 * queued + max_calibration_rows + 3 * batch_rows) + 4 * n_features**2)

    def add(self, ids: list[str], log_sq_norms: np.ndarray, nll: np.ndarray) -> None:
        """Add a batch of decodable rows: ids (n,), features (n, L), NLL (n,)."""
        if self.training_id_hash_range is not None:
            self.training_rows += int(training_rows(ids, self.training_id_hash_range).sum())
        hashes = split_hash(ids)
        calibration = (hashes < self.calibration_fraction) & (hashes < self._largest_kept_hash)
        self._fit_on(log_sq_norms[~calibration], nll[~calibration])
        self._hashes.append(hashes[calibration])
        self._features.append(log_sq_norms[calibration])
        self._nll.append(nll[calibration])
        self._pending_rows += int(calibration.sum())
        if self._pending_rows > self.max_calibration_rows // 4:
            self._trim()

    def merge(self, other: FitReduce) -> FitReduce:
        """This reduce with another's rows added (same settings): what one reduce of both their rows holds,
        its statistics up to float rounding. Returns self."""
        self.training_rows += other.training_rows
        self.stats = self.stats.merge(other.stats)
        self.nll_sum, self.nll_count = self.nll_sum + other.nll_sum, self.nll_count + other.nll_count
        self._hashes += other._hashes
        self._features += other._features
        self._nll += other._nll
        self._pending_rows += other.calibration_rows
        self._largest_kept_hash = min(self._largest_kept_hash, other._largest_kept_hash)
        if self._pending_rows > self.max_calibration_rows // 4:
            self._trim()
        return self

    def to_bytes(self) -> bytes:
        """The reduce as bytes (NumPy's format, no pickles), for a partial passed between Ray tasks."""
        self._trim()
        stats = self.stats
        buffer = io.BytesIO()
        np.savez(
            buffer,
            settings=np.array([self.calibration_fraction, self.max_calibration_rows, self._largest_kept_hash]),
            training_range=np.array(self.training_id_hash_range or [], np.float64),
            counts=np.array([self.training_rows, self.nll_count, stats.count], np.int64),
            nll_sum=np.array(self.nll_sum),
            mean=stats.mean,
            comoment=stats.comoment,
            n_at_floor=stats.n_at_floor,
            hashes=self._hashes[0],
            features=self._features[0],
            nll=self._nll[0],
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FitReduce:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        fraction, cap, largest = arrays["settings"]
        training_range = tuple(arrays["training_range"]) or None
        reduce = cls(arrays["mean"].shape[0], float(fraction), int(cap), training_range)
        reduce.training_rows, reduce.nll_count, count = (int(value) for value in arrays["counts"])
        reduce.nll_sum = float(arrays["nll_sum"])
        reduce.stats = FeatureStats(count, arrays["mean"], arrays["comoment"], arrays["n_at_floor"])
        reduce._hashes, reduce._features, reduce._nll = [arrays["hashes"]], [arrays["features"]], [arrays["nll"]]
        reduce._largest_kept_hash = float(largest)
        return reduce

    @property
    def calibration_rows(self) -> int:
        """Calibration rows kept so far (after `finish`: exactly those the detector calibrates on)."""
        return sum(len(hashes) for hashes in self._hashes)

    def _fit_on(self, features: np.ndarray, nll: np.ndarray) -> None:
        self.stats = self.stats.update(features)
        self.nll_sum += float(np.sum(nll))
        self.nll_count += len(nll)

    def _trim(self) -> None:
        """Keep the `max_calibration_rows` calibration rows with the smallest hashes; the others join the fit."""
        hashes, features, nll = (np.concatenate(parts) for parts in (self._hashes, self._features, self._nll))
        order = np.argsort(hashes, kind="stable")
        kept, past_cap = order[: self.max_calibration_rows], order[self.max_calibration_rows :]
        self._fit_on(features[past_cap], nll[past_cap])
        self._hashes, self._features, self._nll = [hashes[kept]], [features[kept]], [nll[kept]]
        self._pending_rows = 0
        if len(kept) == self.max_calibration_rows:
            self._largest_kept_hash = float(hashes[kept[-1]])

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


def fit_rows(
    ids: list[str],
    log_sq_norms: np.ndarray,
    nll: np.ndarray,
    settings: DetectorSettings,
    rules: Sequence[str] = (),
) -> tuple[dict[str, GradNormDetector], TypicalityTest, int]:
    """What `fimood fit` fits on these rows (its split, its reduce), in one process: a detector per rule
    (default: the settings' rule), the Typicality baseline, and how many rows the statistics hold."""
    reduce = FitReduce(log_sq_norms.shape[1], settings.calibration_fraction)
    reduce.add(ids, log_sq_norms, nll)
    fitted = {rule: reduce.finish(settings.false_positive_rate, rule) for rule in rules or (settings.rule,)}
    typicality = next(iter(fitted.values()))[1]
    return {rule: detector for rule, (detector, _) in fitted.items()}, typicality, reduce.stats.count
