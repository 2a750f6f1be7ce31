"""Dataset-shift tests for a partition of scored rows against the detector's reference, and the false-alarm budgets.

Everything starts from a `PartitionSummary`, small and mergeable: the rows' ranks among the
calibration scores (a histogram on the calibration grid) and per-layer sums of z-scores and of their
squares. A history of summaries is enough to test, plot and merge; no score table is read twice.

Three tests per partition, each valid *given the reference* a deployment keeps, for all but a share
`risk` of references (their reasons are in docs/monitoring.md):
- rate: the rows flagged at the detector's threshold, binomial at an upper bound of the threshold's
  true rate (an order statistic of m calibration scores);
- rank: the partition's mean rank among the calibration scores (Mann–Whitney's U), against m/2 up to
  the calibration set's own offset;
- layers: Hotelling's T² of the layers' mean z-scores, with the fit set's correlation of the layers
  (their norms move together, so one test of them all), up to the fitted means' own offset and the
  fitted correlation's own error; each layer's own mean shift, with Holm's correction, names the
  layers that moved.
Two effect sizes, both lower confidence bounds: `excess`, the share of rows the reference cannot
account for, and `mean_shift`, how far the layers' mean moved, in in-distribution SDs (Mahalanobis).
The budgets (`NightlyBudget`, `LifetimeBudget`) run over a stream's nights.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

EXCESS_CUTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # p-value cuts at which the excess share is measured
TESTS = ("rate", "rank", "layers")
EIGENVALUE_FLOOR = 1e-10  # relative: directions of the layers' correlation with less spread carry no test
MAX_SINGULAR_GAP = 0.9  # the layers tested at most: √(k/ν) + t below this, so R̂'s error stays bounded
DEFAULT_REFERENCE_RISK = 0.05  # δ: the tests hold for all but this share of references
DEFAULT_MIN_EXCESS = 0.01  # a shift moves at least 1% of a partition's rows away from the reference...
DEFAULT_MIN_MEAN_SHIFT = 0.1  # ...or the layers' mean by a tenth of an in-distribution standard deviation


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
    """What the partitions are tested against: the detector's calibration and fit set sizes, its threshold.

    Every night is tested against the *same* reference, so its own estimation error (the threshold's
    true rate, the calibration scores' true ranks, the fitted layer means) is shared by every night.
    Each test therefore takes the null "the night is in distribution, up to how far this reference
    can be off" (an interval null), with the reference's error bounded with probability 1 − `risk`
    over references (`risk` split evenly across the tests). Given the reference, nights are then
    independent and each test's level holds for *this* reference, not only on average over references.
    """

    n_calibration: int  # m
    above_threshold: int  # calibration rows scoring above the threshold (j): a row is flagged when k <= j
    n_fit: int  # rows the per-layer means and spreads were fitted on
    layer_names: list[str]  # of the kept features, in z-score order
    correlation: np.ndarray | None = field(default=None, repr=False, compare=False)  # of the layers' z-scores
    risk: float = DEFAULT_REFERENCE_RISK  # δ: the probability that the reference is off by more than allowed

    def __post_init__(self) -> None:
        if not 0.0 < self.risk < 1.0:
            raise ValueError(f"reference risk must be in (0, 1), got {self.risk}")

    @classmethod
    def of(cls, per_row, feature_names: list[str], risk: float = DEFAULT_REFERENCE_RISK) -> Reference:
        """The reference of a fitted per-row `GradNormDetector` over features named `feature_names`."""
        kept, stats = per_row.rule_.kept_features_, per_row.stats_
        std = stats.std[kept]
        return cls(
            n_calibration=len(per_row.calibration_scores_),
            above_threshold=int((per_row.calibration_scores_ > per_row.threshold_).sum()),
            n_fit=stats.count,
            layer_names=[name for name, keep in zip(feature_names, kept, strict=True) if keep],
            correlation=stats.comoment[np.ix_(kept, kept)] / np.outer(std, std) / (stats.count - 1),
            risk=risk,
        )

    @property
    def tests(self) -> tuple[str, ...]:
        return TESTS if self.layer_names else TESTS[:2]

    @property
    def test_risk(self) -> float:
        """Each test's share of the risk (Bonferroni over the tests: all bounds hold together w.p. ≥ 1 − risk)."""
        return self.risk / len(self.tests)

    @property
    def expected_rate(self) -> float:
        """The share of in-distribution rows flagged, averaged over calibration sets: (j + 1)/(m + 1)."""
        return (self.above_threshold + 1) / (self.n_calibration + 1)

    @functools.cached_property
    def rate_bound(self) -> float:
        """An upper bound on this threshold's true in-distribution rate, w.p. 1 − test_risk over calibration sets.

        The threshold is the (m − j)-th of m calibration scores, so its true rate is the (j + 1)-th of m
        uniform order statistics: Beta(j + 1, m − j).
        """
        m, j = self.n_calibration, self.above_threshold
        return float(scipy.stats.beta.isf(self.test_risk, j + 1, m - j))

    @functools.cached_property
    def rank_bound(self) -> float:
        """How far the calibration set can move a row's mean rank k (count of calibration scores at least
        as high) from m/2, w.p. 1 − test_risk: given the calibration set, E[k] = Σⱼ F(cⱼ), a sum of m
        uniforms (mean m/2, variance m/12) over calibration sets."""
        return float(scipy.stats.norm.isf(self.test_risk / 2) * math.sqrt(self.n_calibration / 12.0))

    @functools.cached_property
    def mean_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The correlation's eigenvalues and eigenvectors that carry the mean test (see `mean_test`): those
        with spread, at most as many as the fit rows can bound (`spectrum_bound`), the largest first kept."""
        values, vectors = np.linalg.eigh(self.correlation)
        keep = values > EIGENVALUE_FLOOR * values.max()
        nu = self.n_fit - 1
        most = int(nu * (MAX_SINGULAR_GAP - self._deviation(nu)) ** 2)  # sqrt(k/ν) + t stays below the gap
        keep &= np.arange(len(values)) >= len(values) - max(most, 0)
        return values[keep], vectors[:, keep]

    def _deviation(self, nu: int) -> float:
        """t with P(s_min < 1 − √(k/ν) − t) ≤ exp(−νt²/2) = the spectrum's share of the risk (Davidson–Szarek)."""
        return math.sqrt(2 * math.log(2 / self.test_risk) / nu)

    @functools.cached_property
    def offset_bound(self) -> float:
        """c: w.p. 1 − test_risk/2, n_fit·d'R⁻¹d ≤ c for the fitted means' offset d from the true means.

        n_fit·d'R⁻¹d is Hotelling's T²(k, ν) with ν = n_fit − 1 (the fitted mean and the fitted
        correlation are independent for Gaussian features), i.e. ν·k/(ν − k + 1)·F(k, ν − k + 1).
        """
        k, nu = len(self.mean_axes[0]), self.n_fit - 1
        return float(nu * k / (nu - k + 1) * scipy.stats.f.isf(self.test_risk / 2, k, nu - k + 1))

    @functools.cached_property
    def spectrum_bound(self) -> float:
        """λ⁺: w.p. 1 − test_risk/2, no direction of R̂⁻¹ exceeds the true R⁻¹ by more than this factor.

        In R's own coordinates R̂ is Wishart(I, ν)/ν, whose smallest eigenvalue is s_min² of a ν × k
        Gaussian matrix over √ν, at least (1 − √(k/ν) − t)² (Davidson and Szarek, 2001).
        """
        k, nu = len(self.mean_axes[0]), self.n_fit - 1
        return 1.0 / (1.0 - math.sqrt(k / nu) - self._deviation(nu)) ** 2

    @functools.cached_property
    def _night_noise_scale(self) -> tuple[float, float]:
        """(g, h): a night's n·u'R̂⁻¹u for its noise u ~ N(0, R/n) is Σ wᵢχ²₁, wᵢ the eigenvalues of
        R^½R̂⁻¹R^½; ≈ g·χ²_h, matching its mean and variance by the inverse-Wishart moments (ν = n_fit − 1).
        Both are spectral averages over k eigenvalues, so for any one reference they are within a fraction of
        a percent of these (Glow's 228 layers: tr 241.9 ± 0.4)."""
        k, nu = len(self.mean_axes[0]), self.n_fit - 1
        mean_weight = nu / (nu - k - 1)
        mean_square_weight = nu**2 * (nu - 1) / ((nu - k) * (nu - k - 1) * (nu - k - 3))
        g = mean_square_weight / mean_weight
        return g, k * mean_weight**2 / mean_square_weight

    def _noncentrality(self, offset: float) -> float:
        """The noncentrality, in the units of g·χ²_h(·), that covers a night mean off by n·‖·‖²_R̂ = `offset`.

        The statistic is n·z̄'R̂⁻¹z̄ = (noise) + 2·(cross term) + offset; the cross term's variance is at
        most 4·λ⁺·offset (`spectrum_bound`), g·χ²_h(ν') gives it 4g²ν', so ν' = offset·max(λ⁺/g, 1)/g,
        whose mean g·ν' ≥ offset too.
        """
        g, _ = self._night_noise_scale
        return offset * max(self.spectrum_bound / g, 1.0) / g

    def mean_statistic(self, z_mean: np.ndarray, n: int) -> float:
        """n·z̄'R⁻¹z̄ over the axes that carry the test."""
        values, vectors = self.mean_axes
        return float(n * ((vectors.T @ z_mean) ** 2 / values).sum())

    def mean_p_value(self, statistic: float, n: int, offset: float | None = None) -> float:
        """P(a night's statistic ≥ `statistic`) when its mean is off by the most the reference allows
        (n·c/n_fit), or by `offset` = n·‖d + s‖²."""
        g, h = self._night_noise_scale
        offset = n * self.offset_bound / self.n_fit if offset is None else offset
        if offset <= 0:
            return float(scipy.stats.chi2.sf(statistic / g, h))
        return float(scipy.stats.ncx2.sf(statistic / g, h, self._noncentrality(offset)))

    def mean_test(self, z_mean: np.ndarray, n: int, confidence: float = 0.95) -> tuple[float, float]:
        """The test of every layer's mean at once over a night of `n` rows: its p-value, and a lower
        confidence bound on how far the layers' mean moved (Mahalanobis, in-distribution SDs).

        Given the reference, the night's mean z̄ is about N(d + s, R/n): d the fitted means' own offset
        (the same every night, ‖d‖²_R̂ ≤ c/n_fit w.p. 1 − test_risk/2), s the shift. The null is s = 0;
        `mean_p_value` bounds the statistic's tail there (docs/monitoring.md). The shift's bound: ‖d + s‖
        is at least √(λ_L/n), λ_L the lower `confidence` bound of n·‖d + s‖², and ‖s‖ ≥ ‖d + s‖ − ‖d‖.
        """
        if self.correlation is None or not len(z_mean) or not len(self.mean_axes[0]):
            return 1.0, 0.0
        statistic = self.mean_statistic(z_mean, n)
        p_value = self.mean_p_value(statistic, n)
        gamma = 1.0 - confidence
        if self.mean_p_value(statistic, n, 0.0) >= gamma:
            return p_value, 0.0
        g, h = self._night_noise_scale  # the bound needs no tail precision: the plain CDF is fast enough
        lowest = scipy.optimize.brentq(
            lambda offset: 1.0 - scipy.special.chndtr(statistic / g, h, self._noncentrality(offset)) - gamma,
            0.0,
            2.0 * statistic + 100.0,
            rtol=1e-6,
        )
        return p_value, max(math.sqrt(lowest / n) - math.sqrt(self.offset_bound / self.n_fit), 0.0)

    def guarantee(
        self, rows: int, level: float, promise: str, min_excess: float = 0.0, min_mean_shift: float = 0.0
    ) -> Guarantee:
        """What this reference promises for nights of `rows` rows under a budget (`promise`, its words) that
        flags a night on its own at p ≤ `level`, with the effect gates (see `Guarantee`)."""
        m, n, j, per_test = self.n_calibration, rows, self.above_threshold, level / len(self.tests)
        # rate: the fewest flagged rows the rate test flags, and that give an excess of `min_excess`
        by_test = int(scipy.stats.binom.isf(per_test, n, self.rate_bound)) + 1
        ends, _ = _excess_grid(m, self.risk)
        looks = max(len(ends), 1)
        null_share = scipy.special.betaincinv(j + 1, m - j, 1 - self.risk / looks)
        counts = np.arange(1, n + 1)
        low = scipy.special.betaincinv(counts, n - counts + 1, 0.05 / looks)
        passing = np.flatnonzero((low - null_share) / (1 - null_share) >= min_excess)
        by_gate = int(counts[passing[0]]) if len(passing) else n
        k = len(self.mean_axes[0]) if self.layer_names and self.correlation is not None else 0
        mean_shift = float("nan")
        if k:
            g, h = self._night_noise_scale
            critical = scipy.stats.ncx2.isf(per_test, h, self._noncentrality(n * self.offset_bound / self.n_fit))
            offset = max(critical - h, 0.0) * g / max(self.spectrum_bound / g, 1.0)  # n·‖d + s‖² that reaches it
            largest_offset = math.sqrt(self.offset_bound / self.n_fit)
            mean_shift = max(math.sqrt(offset / n) + largest_offset, min_mean_shift + 2 * largest_offset)
        return Guarantee(
            risk=self.risk,
            level=level,
            rows=rows,
            promise=promise,
            rate_allowance=self.rate_bound - self.expected_rate,
            detectable_rate_excess=max(by_test, by_gate) / n - self.expected_rate,
            detectable_mean_shift=mean_shift,
            reference_dominates=n > m or (k > 0 and n > self.n_fit),
        )


@dataclass(frozen=True)
class Guarantee:
    """The promise a reference gives for nights of `rows` rows: with probability ≥ 1 − `risk` over the draw
    of the reference, the budget's `promise` holds for it (each test's level holds given the reference).

    The price is power: the reference's own error is allowed for every night, so an effect smaller than
    it cannot be told from it. `detectable_*` are about the effects a night must show to be flagged on its
    own (p ≤ `level`, all tests counted, and past the effect gates): the OOD rate's excess at the
    threshold; the layers' mean shift in in-distribution SDs when the reference's own offset points the
    other way (the worst case). `reference_dominates`: a night has more rows than the calibration set
    (rate, rank) or the fit set (layers), so the reference's error, not the night's, sets those effects;
    fit on more rows to lower them.
    """

    risk: float
    level: float
    rows: int
    promise: str
    rate_allowance: float
    detectable_rate_excess: float
    detectable_mean_shift: float
    reference_dominates: bool

    def __str__(self) -> str:
        text = (
            f"with probability ≥ {1 - self.risk:.0%} over the draw of this reference, {self.promise}; a night "
            f"of {self.rows} rows is flagged on its own (p ≤ {self.level:.2g}) when its OOD rate is "
            f"{self.detectable_rate_excess:+.1%} above the expected"
        )
        if not math.isnan(self.detectable_mean_shift):
            text += f" or the layers' mean moved by about {self.detectable_mean_shift:.2f} SD (worst case)"
        return text


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
    excess: float  # a lower bound on the share of rows the reference cannot account for (see `excess_share`)
    mean_shift: float = 0.0  # a lower bound on how far the layers' mean moved, in in-distribution SDs
    largest_layer_shift: float = 0.0  # the largest |mean z-score| of one layer, in its standard deviations
    top_layers: list[str] = field(default_factory=list)  # layers that moved (Holm ≤ 0.05), largest first

    def large(self, min_excess: float, min_mean_shift: float) -> bool:
        """The effect is worth an alarm (`large_effect`)."""
        return large_effect(self.excess, self.mean_shift, min_excess, min_mean_shift)

    @property
    def p_value(self) -> float:
        """Bonferroni over the tests run (rate, rank, and layers when there are layers)."""
        if len(self.layer_p) == 0:
            return min(1.0, 2 * min(self.rate_p, self.rank_p))
        return min(1.0, len(TESTS) * min(self.rate_p, self.rank_p, self.layers_p))


def large_effect(excess: float, mean_shift: float, min_excess: float, min_mean_shift: float) -> bool:
    """An effect worth an alarm: enough rows beyond the reference, or the layers' mean moved enough."""
    return excess >= min_excess or mean_shift >= min_mean_shift


def shift_tests(summary: PartitionSummary, reference: Reference, top: int = 5) -> ShiftTests:
    """Test one partition's summary against the reference, each test valid given the reference (w.p. 1 − risk)."""
    n, m, j = summary.scored, reference.n_calibration, reference.above_threshold
    if n == 0:
        empty = np.ones(len(reference.layer_names))
        return ShiftTests(0, 0, 0.0, reference.expected_rate, (0.0, 0.0), 1.0, 0.5, 1.0, 1.0, 0 * empty, empty, 0.0)
    # rate: flagged rows are binomial(n, q) given the reference, q at most `rate_bound`
    flagged = int(summary.rank_counts[: j + 1].sum())
    rate_p = float(scipy.special.bdtrc(flagged - 1, n, reference.rate_bound)) if flagged else 1.0
    low = scipy.special.betaincinv(flagged, n - flagged + 1, 0.025) if flagged else 0.0  # Clopper–Pearson, 95%
    high = scipy.special.betaincinv(flagged + 1, n - flagged, 0.975) if flagged < n else 1.0
    ci = (float(low) - reference.expected_rate, float(high) - reference.expected_rate)

    # rank: the night's mean rank k̄ against m/2, up to the calibration set's own offset (`rank_bound`)
    ranks = np.arange(m + 1)
    mean_rank = float((ranks * summary.rank_counts).sum() / n)
    spread = math.sqrt(max(float((summary.rank_counts * (ranks - mean_rank) ** 2).sum()) / max(n - 1, 1), 1e-12))
    distance, error = abs(mean_rank - m / 2), spread / math.sqrt(n)
    rank_p = float(
        scipy.special.ndtr((reference.rank_bound - distance) / error)
        + scipy.special.ndtr(-(distance + reference.rank_bound) / error)
    )

    # layers: the mean of all at once (`Reference.mean_test`); each layer's own shift, beyond what the
    # fitted mean's error allows (Bonferroni over layers), only names the layers that moved
    mean = summary.z_sum / n
    variance = np.maximum(summary.z_sq_sum / n - mean**2, 1e-12)
    allowed = scipy.stats.norm.isf(reference.test_risk / (2 * max(len(mean), 1))) / math.sqrt(reference.n_fit)
    shift = np.sign(mean) * np.maximum(np.abs(mean) - allowed, 0.0) / np.sqrt(variance / n)
    layer_p = holm(2 * scipy.special.ndtr(-np.abs(shift)))
    layers_p, mean_shift = reference.mean_test(mean, n)
    order = np.argsort(-np.abs(shift))
    return ShiftTests(
        scored=n,
        flagged=flagged,
        ood_rate=flagged / n,
        expected_rate=reference.expected_rate,
        excess_rate_ci=ci,
        rate_p=rate_p,
        auc=1.0 - mean_rank / m,
        rank_p=min(rank_p, 1.0),
        layers_p=layers_p,
        layer_shift=shift,
        layer_p=layer_p,
        excess=excess_share(summary, reference.risk),
        mean_shift=mean_shift,
        largest_layer_shift=float(np.abs(mean).max()) if len(mean) else 0.0,
        top_layers=[reference.layer_names[i] for i in order[:top] if layer_p[i] <= 0.05],
    )


def excess_share(summary: PartitionSummary, risk: float = DEFAULT_REFERENCE_RISK, confidence: float = 0.95) -> float:
    """A lower bound on the share of rows the reference cannot account for.

    With a share π of new rows, the share of p-values at most t is at most (1 − π)·G(t) + π, G(t) the
    in-distribution share, so π ≥ (share − G)/(1 − G); the same holds for the share *above* 1 − t (rows
    unusually typical). Given the calibration set, G at a cut of the grid that k calibration scores
    pass is an order statistic of m uniforms, Beta(k + 1, m − k): its upper bound at `risk` stands in
    for G, and the night's share is its Clopper–Pearson lower bound at `confidence` (both Bonferroni
    over the cuts and tails), so neither the calibration set's noise nor the night's shows as an excess.
    """
    m, n = len(summary.rank_counts) - 1, summary.scored
    if n == 0:
        return 0.0
    ends, null_shares = _excess_grid(m, risk)
    tail_counts = np.array(
        [summary.rank_counts[:end].sum() if end > 0 else summary.rank_counts[end:].sum() for end in ends]
    )
    looks = len(ends)
    shares = np.where(
        tail_counts > 0,
        scipy.special.betaincinv(np.maximum(tail_counts, 1), n - tail_counts + 1, (1 - confidence) / looks),
        0.0,
    )
    return float(max(0.0, ((shares - null_shares) / (1 - null_shares)).max())) if looks else 0.0


@functools.lru_cache(maxsize=64)
def _excess_grid(m: int, risk: float) -> tuple[np.ndarray, np.ndarray]:
    """The tails the excess looks at, and each one's upper bound on its in-distribution share.

    A tail is `rank_counts[:end]` (p-value at most a cut: end = k + 1 rows of the grid) for end > 0, or
    `rank_counts[-end:]` (p-value above 1 − cut) for end < 0; its in-distribution share is
    Beta(k + 1, m − k) given the calibration set, bounded at risk / (number of tails).
    """
    tails = []
    for cut in EXCESS_CUTS:
        low, high = _ranks_at_most(cut, m), _ranks_at_most(1.0 - cut, m)
        if 0 <= low < m:
            tails.append((low + 1, low + 1, m - low))  # k <= low
        if 0 <= high < m:
            tails.append((-(m - high), m - high, high + 1))  # k > high
    ends = np.array([end for end, _, _ in tails], dtype=np.int64)
    a, b = np.array([t[1] for t in tails], float), np.array([t[2] for t in tails], float)
    null_shares = scipy.special.betaincinv(a, b, 1 - risk / max(len(tails), 1)) if tails else np.zeros(0)
    return ends, null_shares


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

    def decide(self, earlier: list[list[Evidence]], tonight: list[Evidence]) -> Decision:
        """Tonight's partitions flagged where their adjusted p-value is at most `alpha` and the effect is large;
        earlier nights do not count. Each partition's statistic is its adjusted p-value."""
        adjusted = self.adjusted([evidence.p_value for evidence in tonight])
        return Decision(
            {e.partition: p for e, p in zip(tonight, adjusted, strict=True)},
            {e.partition for e, p in zip(tonight, adjusted, strict=True) if p <= self.alpha and e.large},
        )

    @property
    def level(self) -> float:
        """The p-value that flags a night's only partition."""
        return self.alpha

    def describe(self) -> str:
        return f"per night: α = {self.alpha}, {self.correction} across the night's partitions"


@dataclass(frozen=True)
class Evidence:
    """One partition's contribution to a night of a stream: its p-value, and whether its effect is large enough."""

    partition: str
    p_value: float
    large: bool = True


@dataclass(frozen=True)
class Decision:
    """A budget's verdict on tonight's partitions: each one's statistic, and those flagged as shifted."""

    statistics: dict[str, float]
    shifted: set[str]


@dataclass(frozen=True)
class LifetimeBudget:
    """Over a stream's life: at most one false alarm in expectation per `nights` nights.

    A Shiryaev–Roberts e-detector over the stream's nights in order, R ← (1 + R)·e, raising an alarm
    and restarting when R ≥ nights. A night's e is the mean of its partitions' e-values (an e-value
    whatever their dependence), so a night is one step however many partitions it holds. Given the
    reference (see `Reference`), nights are independent and each e has mean at most 1, so R − t is a
    supermartingale and, by optional stopping (Ville's inequality's argument), the mean time to a false
    alarm is at least `nights` (Shin, Ramdas and Rinaldo, 2023).

    After an alarm the shift is *still on* for each following night whose own p-value (Bonferroni over
    its partitions) is at most `still_shifted_level`, until one is not: a lasting shift is reported every
    night, not once. A false alarm is followed by such a night with probability at most that level, so
    when nothing shifts there are at most 1/(1 − level) flagged nights in expectation per `nights` nights.
    """

    nights: float = 365.0
    still_shifted_level: float = 0.01

    def __post_init__(self) -> None:
        if self.nights < 1:
            raise ValueError(f"nights per false alarm must be at least 1, got {self.nights}")

    def night_statistics(self, nights: list[list[Evidence]]) -> tuple[list[float], list[list[Evidence]]]:
        """R after each night, and each night's flagged partitions: on a night that alarms (or is still
        shifted), those with a large effect whose p-value, Bonferroni over the night, is at most
        `still_shifted_level`, and always the strongest of them. Only nights with a large effect alarm."""
        statistic, shifted, path, flagged = 0.0, False, [], []
        for night in nights:
            large = [evidence for evidence in night if evidence.large]
            if night:
                statistic = (1.0 + statistic) * float(np.mean([e_value(evidence.p_value) for evidence in night]))
            p_night = min(1.0, len(night) * min(evidence.p_value for evidence in large)) if large else 1.0
            alarm = statistic >= self.nights and bool(large)
            shifted = alarm or (shifted and p_night <= self.still_shifted_level)
            path.append(statistic)
            if not shifted:
                flagged.append([])
                continue
            strongest = min(large, key=lambda evidence: evidence.p_value)
            level = self.still_shifted_level / len(night)
            flagged.append([e for e in large if e is strongest or e.p_value <= level])
            statistic = 0.0
        return path, flagged

    def decide(self, earlier: list[list[Evidence]], tonight: list[Evidence]) -> Decision:
        """Tonight as the stream's last night after `earlier` (in the order they were monitored); every
        partition's statistic is R after tonight."""
        path, flagged = self.night_statistics([*earlier, tonight])
        return Decision({e.partition: path[-1] for e in tonight}, {e.partition for e in flagged[-1]})

    @functools.cached_property
    def level(self) -> float:
        """The p-value that flags a night's only partition on its own, from R = 0: e(p) = nights."""
        log_p = scipy.optimize.brentq(lambda x: math.log(e_value(math.exp(x))) - math.log(self.nights), -700.0, 0.0)
        return math.exp(log_p)

    def statistics(self, p_values: list[float], allowed: list[bool] | None = None) -> tuple[list[float], list[bool]]:
        """`night_statistics` for a stream of one partition a night: R after each, and whether it is flagged."""
        nights = [[Evidence(str(i), p, allowed is None or allowed[i])] for i, p in enumerate(p_values)]
        path, flagged = self.night_statistics(nights)
        return path, [bool(night) for night in flagged]

    def describe(self) -> str:
        return f"over the stream's life: at most one false alarm in expectation per {self.nights:g} nights"
