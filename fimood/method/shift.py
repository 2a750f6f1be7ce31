"""Dataset-shift tests for a partition of scored rows against the detector's reference, and the false-alarm budgets.

Everything starts from a `PartitionSummary`, small and mergeable: the rows' ranks among the
calibration scores (a histogram on the calibration grid) and per-layer sums of z-scores and of their
squares. A history of summaries is enough to test, plot and merge; no score table is read twice.

Three tests per partition (their reasons are in docs/monitoring.md):
- rate: the rows flagged at the detector's threshold against its calibrated rate, exactly
  (beta-binomial: the threshold is itself an order statistic of m calibration rows);
- rank: Mann–Whitney's U of the partition's scores against the calibration scores, from the histogram;
- layers: Hotelling's T² of the layers' mean z-scores against 0, with the fit set's correlation of
  the layers (their norms move together, so one test of them all, not one per layer); each layer's
  own mean shift, with Holm's correction, then names the layers that moved.
Two effect sizes: `excess`, the share of rows the reference cannot account for, and `mean_shift`,
how far the layers' mean moved, in in-distribution standard deviations (Mahalanobis).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.stats

EXCESS_CUTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # p-value cuts at which the excess share is measured
TESTS = ("rate", "rank", "layers")
EIGENVALUE_FLOOR = 1e-10  # relative: directions of the layers' correlation with less spread carry no test


@dataclass
class PartitionSummary:
    """What the monitor keeps of a partition's score rows; `merge` adds two partitions' summaries.

    rank_counts[k]: scored rows with exactly k calibration scores at least as high as theirs
    (k = 0..m, so its length is m + 1); z_sum, z_sq_sum: per layer, over scored rows.
    """

    rows: int
    errors_by_reason: dict[str, int]
    rank_counts: np.ndarray
    z_sum: np.ndarray
    z_sq_sum: np.ndarray

    @classmethod
    def empty(cls, n_calibration: int, n_layers: int) -> PartitionSummary:
        return cls(0, {}, np.zeros(n_calibration + 1, np.int64), np.zeros(n_layers), np.zeros(n_layers))

    @classmethod
    def from_rows(
        cls, calibration_scores: np.ndarray, ood_scores: np.ndarray, z_scores: np.ndarray, errors: list[str | None]
    ) -> PartitionSummary:
        """Summarise rows: `ood_scores` (n,) and `z_scores` (n, L) of the rows without an error, `errors` of all."""
        at_least = len(calibration_scores) - np.searchsorted(calibration_scores, ood_scores, side="left")
        return cls(
            rows=len(errors),
            errors_by_reason=dict(Counter(error for error in errors if error is not None)),
            rank_counts=np.bincount(at_least, minlength=len(calibration_scores) + 1).astype(np.int64),
            z_sum=z_scores.sum(axis=0),
            z_sq_sum=(z_scores**2).sum(axis=0),
        )

    @property
    def scored(self) -> int:
        return int(self.rank_counts.sum())

    def merge(self, other: PartitionSummary) -> PartitionSummary:
        return PartitionSummary(
            self.rows + other.rows,
            dict(Counter(self.errors_by_reason) + Counter(other.errors_by_reason)),
            self.rank_counts + other.rank_counts,
            self.z_sum + other.z_sum,
            self.z_sq_sum + other.z_sq_sum,
        )

    def p_value_share(self, cut: float) -> float:
        """Share of scored rows whose conformal p-value is at most `cut`."""
        m = len(self.rank_counts) - 1
        return float(self.rank_counts[: _ranks_at_most(cut, m) + 1].sum() / max(self.scored, 1))


@dataclass(frozen=True)
class Reference:
    """What the partitions are tested against: the detector's calibration and fit set sizes, its threshold."""

    n_calibration: int  # m
    above_threshold: int  # calibration rows scoring above the threshold (j): a row is flagged when k <= j
    n_fit: int  # rows the per-layer means and spreads were fitted on
    layer_names: list[str]  # of the kept features, in z-score order
    correlation: np.ndarray | None = field(default=None, repr=False, compare=False)  # of the layers' z-scores

    @classmethod
    def of(cls, per_row, feature_names: list[str]) -> Reference:
        """The reference of a fitted per-row `GradNormDetector` over features named `feature_names`."""
        kept, stats = per_row.rule_.kept_features_, per_row.stats_
        std = stats.std[kept]
        return cls(
            n_calibration=len(per_row.calibration_scores_),
            above_threshold=int((per_row.calibration_scores_ > per_row.threshold_).sum()),
            n_fit=stats.count,
            layer_names=[name for name, keep in zip(feature_names, kept, strict=True) if keep],
            correlation=stats.comoment[np.ix_(kept, kept)] / np.outer(std, std) / (stats.count - 1),
        )

    @functools.cached_property
    def mean_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The correlation's eigenvalues and eigenvectors that carry the mean test (see `mean_test`)."""
        values, vectors = np.linalg.eigh(self.correlation)
        keep = values > EIGENVALUE_FLOOR * values.max()
        keep &= np.arange(len(values)) >= len(values) - (self.n_fit - 2)  # Hotelling needs n_fit − 1 > axes
        return values[keep], vectors[:, keep]

    def mean_test(self, z_mean: np.ndarray, n: int) -> tuple[float, float]:
        """Hotelling's T² of a partition's mean z-score over `n` rows: its p-value, and the mean's shift.

        Under no shift the mean is about N(0, R·(1/n + 1/n_fit)) (the fit's own mean is an estimate too)
        and R is estimated from n_fit rows, so (ν − k + 1)/(ν·k)·T² is F(k, ν − k + 1) with ν = n_fit − 1
        over k axes. The shift is the Mahalanobis length of the mean, its noise k·(1/n + 1/n_fit) taken off.
        """
        if self.correlation is None or not len(z_mean):
            return 1.0, 0.0
        values, vectors = self.mean_axes
        k, nu, noise = len(values), self.n_fit - 1, 1.0 / n + 1.0 / self.n_fit
        distance = float(((vectors.T @ z_mean) ** 2 / values).sum())
        statistic = (nu - k + 1) / (nu * k) * distance / noise
        return float(scipy.stats.f.sf(statistic, k, nu - k + 1)), math.sqrt(max(distance - k * noise, 0.0))

    @property
    def expected_rate(self) -> float:
        """The share of in-distribution rows flagged, averaged over calibration sets: (j + 1)/(m + 1)."""
        return (self.above_threshold + 1) / (self.n_calibration + 1)


@dataclass
class ShiftTests:
    """The tests of one partition; p-values are one per test, `p_value` combines them (Bonferroni over 3)."""

    scored: int
    flagged: int
    ood_rate: float
    expected_rate: float
    excess_rate_ci: tuple[float, float]  # 95% Clopper–Pearson interval of the OOD rate, minus the expected rate
    rate_p: float
    auc: float  # P(partition row scores above a calibration row); 0.5 when nothing moved
    rank_p: float
    layers_p: float  # Hotelling's test of the layers' mean (`Reference.mean_test`)
    layer_shift: np.ndarray  # per layer: mean z / its standard error
    layer_p: np.ndarray  # per layer, Holm-adjusted: which layers moved
    excess: float  # the share of rows the reference cannot account for (see `excess_share`)
    mean_shift: float = 0.0  # how far the layers' mean moved, in in-distribution standard deviations
    largest_layer_shift: float = 0.0  # the largest |mean z-score| of one layer, in its standard deviations
    top_layers: list[str] = field(default_factory=list)  # layers that moved (Holm ≤ 0.05), largest first

    def large(self, min_excess: float, min_mean_shift: float) -> bool:
        """The effect is worth an alarm: enough rows beyond the reference, or the layers' mean moved enough."""
        return self.excess >= min_excess or self.mean_shift >= min_mean_shift

    @property
    def p_value(self) -> float:
        """Bonferroni over the tests run (rate, rank, and layers when there are layers)."""
        if len(self.layer_p) == 0:
            return min(1.0, 2 * min(self.rate_p, self.rank_p))
        return min(1.0, len(TESTS) * min(self.rate_p, self.rank_p, self.layers_p))


def shift_tests(summary: PartitionSummary, reference: Reference, top: int = 5) -> ShiftTests:
    """Test one partition's summary against the reference."""
    n, m, j = summary.scored, reference.n_calibration, reference.above_threshold
    if n == 0:
        empty = np.ones(len(reference.layer_names))
        return ShiftTests(0, 0, 0.0, reference.expected_rate, (0.0, 0.0), 1.0, 0.5, 1.0, 1.0, 0 * empty, empty, 0.0)
    flagged = int(summary.rank_counts[: j + 1].sum())
    rate_p = float(scipy.stats.betabinom.sf(flagged - 1, n, j + 1, m - j))
    interval = scipy.stats.binomtest(flagged, n).proportion_ci(0.95)
    ci = (interval.low - reference.expected_rate, interval.high - reference.expected_rate)

    below = float(((m - np.arange(m + 1)) * summary.rank_counts).sum())  # U: (row, calibration row) pairs, row higher
    sd = math.sqrt(n * m * (n + m + 1) / 12.0)
    rank_p = float(2 * scipy.stats.norm.sf(abs(below - n * m / 2) / sd))

    mean = summary.z_sum / n
    variance = np.maximum(summary.z_sq_sum / n - mean**2, 0.0)
    shift = mean / np.sqrt(variance / n + 1.0 / reference.n_fit)  # the fit's mean is an estimate too
    layer_p = holm(2 * scipy.stats.norm.sf(np.abs(shift)))
    layers_p, mean_shift = reference.mean_test(mean, n)
    order = np.argsort(-np.abs(shift))
    return ShiftTests(
        scored=n,
        flagged=flagged,
        ood_rate=flagged / n,
        expected_rate=reference.expected_rate,
        excess_rate_ci=ci,
        rate_p=rate_p,
        auc=below / (n * m),
        rank_p=min(rank_p, 1.0),
        layers_p=layers_p,
        layer_shift=shift,
        layer_p=layer_p,
        excess=excess_share(summary),
        mean_shift=mean_shift,
        largest_layer_shift=float(np.abs(mean).max()) if len(mean) else 0.0,
        top_layers=[reference.layer_names[i] for i in order[:top] if layer_p[i] <= 0.05],
    )


def excess_share(summary: PartitionSummary) -> float:
    """A lower bound (about 95%) on the share of rows the reference cannot account for.

    With a share π of new rows, the share of p-values at most t is at most (1 − π)·t + π, so
    π ≥ (share − t)/(1 − t); the same holds for the share *above* 1 − t (rows unusually typical).
    Both the night's share and the calibration grid's t are estimates, off by about
    √(t(1 − t)(1/n + 1/m)); that margin (Bonferroni over the cuts and tails) comes off each bound, so
    a large night against a small calibration set does not show an excess that is only the
    calibration set's own noise.
    """
    m, n = len(summary.rank_counts) - 1, max(summary.scored, 1)
    z = float(scipy.stats.norm.isf(0.05 / (2 * len(EXCESS_CUTS))))
    best = 0.0
    for cut in EXCESS_CUTS:
        for share, t in (
            (summary.p_value_share(cut), (_ranks_at_most(cut, m) + 1) / (m + 1)),
            (1.0 - summary.p_value_share(1.0 - cut), 1.0 - (_ranks_at_most(1.0 - cut, m) + 1) / (m + 1)),
        ):
            if 0 < t < 1:
                margin = z * math.sqrt(t * (1 - t) * (1 / n + 1 / m))
                best = max(best, (share - t - margin) / (1 - t))
    return best


def _ranks_at_most(cut: float, m: int) -> int:
    """The largest k whose p-value (1 + k)/(1 + m) is at most `cut` (−1 when none is)."""
    return math.floor(cut * (m + 1) + 1e-9) - 1


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error, any dependence)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p_values)
    scaled = (len(p_values) - np.arange(len(p_values))) * p_values[order]
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate, independent or positively dependent tests)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    n = len(p_values)
    order = np.argsort(p_values)
    scaled = n * p_values[order] / np.arange(1, n + 1)
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return adjusted


def bonferroni(p_values: np.ndarray) -> np.ndarray:
    return np.minimum(1.0, len(p_values) * np.asarray(p_values, dtype=np.float64))


CORRECTIONS = {"bonferroni": bonferroni, "bh": benjamini_hochberg}


def e_value(p_value: float) -> float:
    """An e-value from a p-value by the mixture calibrator ∫₀¹ κ·p^(κ−1) dκ (Vovk and Wang, 2021).

    Its expectation is at most 1 for a valid p-value, so products and Shiryaev–Roberts sums of
    them over nights are test (super)martingales.
    """
    p = min(max(p_value, 1e-300), 1.0)
    if p > 1 - 1e-12:
        return 0.5  # the limit at p = 1
    log_p = math.log(p)
    return (1 - p + p * log_p) / (p * log_p**2)


@dataclass(frozen=True)
class NightlyBudget:
    """Per night: α across the night's partitions, Bonferroni (family-wise) or Benjamini–Hochberg (FDR)."""

    alpha: float = 0.01
    correction: str = "bh"

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {self.correction!r}")

    def adjusted(self, p_values: list[float]) -> list[float]:
        """The night's p-values corrected across its partitions; significant where at most `alpha`."""
        return [float(p) for p in CORRECTIONS[self.correction](np.array(p_values, dtype=np.float64))]

    def significant(self, p_values: list[float]) -> list[bool]:
        return [p <= self.alpha for p in self.adjusted(p_values)]

    def describe(self) -> str:
        return f"per night: α = {self.alpha}, {self.correction} across the night's partitions"


@dataclass(frozen=True)
class LifetimeBudget:
    """Over the monitor's life: at most one false alarm in expectation per `nights` nights.

    A Shiryaev–Roberts e-detector over the partitions in order, R ← (1 + R)·e(p), raising an alarm and
    restarting when R ≥ nights: R − t is a supermartingale when nothing shifts, so by optional
    stopping (Ville's inequality's argument) the mean time to a false alarm is at least `nights`
    (Shin, Ramdas and Rinaldo, 2023).

    After an alarm the shift is *still on* for each following night whose own p-value is at most
    `still_shifted_level`, until one is not: a lasting shift is reported every night, not once. A
    false alarm is followed by such a night with probability at most that level, so when nothing
    shifts there are at most 1/(1 − level) flagged nights in expectation per `nights` nights.
    """

    nights: float = 365.0
    still_shifted_level: float = 0.01

    def __post_init__(self) -> None:
        if self.nights < 1:
            raise ValueError(f"nights per false alarm must be at least 1, got {self.nights}")

    def statistics(self, p_values: list[float], allowed: list[bool] | None = None) -> tuple[list[float], list[bool]]:
        """R after each partition, and whether it is flagged: R ≥ nights, or the shift still on after
        an alarm; in both cases only when `allowed` (the effect is large enough)."""
        statistic, shifted, path, flags = 0.0, False, [], []
        for index, p in enumerate(p_values):
            large = allowed is None or allowed[index]
            statistic = (1.0 + statistic) * e_value(p)
            alarm = statistic >= self.nights and large
            shifted = alarm or (shifted and p <= self.still_shifted_level and large)
            path.append(statistic)
            flags.append(shifted)
            if shifted:
                statistic = 0.0
        return path, flags

    def describe(self) -> str:
        return f"over the monitor's life: at most one false alarm in expectation per {self.nights:g} nights"
