"""Scoring rules: from log gradient-norm features to one OOD score per row, each fitted from `FeatureStats`.

Every rule standardises features by the in-distribution mean and spread, z = (f − μ)/σ, and differs
in how it adds them up. All use gradient features only, so all keep the method's invariance.

- `paper`: −Σ log N(fℓ; μℓ, σℓ), the paper's independent Gaussian (two-sided: unusually small
  gradients count as much as large ones).
- `one-sided`: Σ ½·max(zℓ, 0)²: only larger-than-usual gradients count, the paper's intuition for OOD.
- `full-cov`: −log N(f; μ, D R D) with R the features' correlation matrix shrunk towards I by the
  Oracle Approximating Shrinkage (Chen et al., 2010): layers' norms move together, and this rule knows
  by how much. (OAS, not Ledoit–Wolf: LW's shrinkage needs per-row fourth moments, which mergeable
  sums of outer products do not hold; OAS needs only the covariance.)
- `combined`: Fisher's combination, −2 Σ log pₖ, of the calibrated p-values of `one-sided` and
  `full-cov`. They look in complementary directions: every layer's gradient larger than usual at
  once (cheap for `full-cov`, whose main axis of variation that is) and a break in how layers
  move together (invisible to `one-sided`). It needs held-out in-distribution rows (`calibrate`).
- `combined-typical`: as `combined`, with `full-cov`'s p-value two-sided. In many dimensions an
  in-distribution row's Mahalanobis distance concentrates around its typical value, so a distance
  unusually *small* is as atypical as one unusually large (the typical-set argument Nalisnick et al.,
  2019, make for the likelihood itself).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import scipy.linalg

from fimood.method.statistics import FeatureStats


class ScoringRule(ABC):
    """A scikit-learn-like estimator over (n, L) log-norm features; higher `ood_score` = more OOD.

    Attributes (after fit): mean_, std_ (L,), kept_features_ (L,) bool (features with zero spread
    over the fit set are dropped), n_features_in_, n_samples_fit_.
    """

    name: ClassVar[str]
    learns_from_calibration: ClassVar[bool] = False  # True: `calibrate` must see held-out rows before scoring

    def fit(self, features: np.ndarray) -> ScoringRule:
        """Fit on (n_samples, n_features) log-norm features."""
        return self.fit_stats(FeatureStats.from_array(features))

    def fit_stats(self, stats: FeatureStats) -> ScoringRule:
        """Fit from merged sufficient statistics (the distributed path)."""
        self.mean_ = stats.mean.copy()
        self.std_ = stats.std
        # A feature is constant when its spread is at float rounding level of its size.
        self.kept_features_ = self.std_ > 1e-9 * np.maximum(1.0, np.abs(self.mean_))
        if not self.kept_features_.any():
            raise ValueError("every feature has zero variance over the fit set; nothing to fit")
        self.n_features_in_ = len(self.mean_)
        self.n_samples_fit_ = stats.count
        return self

    def calibrate(self, features: np.ndarray) -> ScoringRule:
        """Learn from held-out in-distribution rows (n, L), for rules that need them; the others keep as they are."""
        return self

    def calibration_state(self) -> dict[str, np.ndarray]:
        """The arrays `calibrate` learned, saved with a detector (default: none)."""
        return {}

    def load_calibration_state(self, arrays: dict[str, np.ndarray]) -> ScoringRule:
        """Restore what `calibration_state` returned (default: nothing to restore)."""
        return self

    def z_scores(self, features: np.ndarray) -> np.ndarray:
        """(f − μ)/σ per kept feature, shape (n, n_kept)."""
        features = self._check(features)
        kept = self.kept_features_
        return (features[:, kept] - self.mean_[kept]) / self.std_[kept]

    @abstractmethod
    def ood_score(self, features: np.ndarray) -> np.ndarray:
        """One score per row of (n, L) features, shape (n,); higher = more OOD."""

    def _check(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit or fit_stats first")
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.n_features_in_:
            raise ValueError(f"expected features of shape (n, {self.n_features_in_}), got {features.shape}")
        return features


class DiagonalGaussian(ScoringRule):
    """The paper's rule: an independent 1-D Gaussian per feature.

    Examples:
        >>> rule = DiagonalGaussian().fit(np.random.default_rng(0).normal(size=(100, 3)))
        >>> rule.score_samples(np.zeros((2, 3))).shape
        (2,)
    """

    name = "paper"

    def score_samples(self, features: np.ndarray) -> np.ndarray:
        """Σ_ℓ log N(f_ℓ; μ_ℓ, σ_ℓ) over kept features, shape (n,); higher = more typical."""
        z = self.z_scores(features)
        std = self.std_[self.kept_features_]
        return (-0.5 * z**2 - np.log(std) - 0.5 * math.log(2 * math.pi)).sum(axis=1)

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        return -self.score_samples(features)


class OneSided(ScoringRule):
    """Σ_ℓ ½·max(z_ℓ, 0)²: a row is unusual only where its gradients are larger than usual."""

    name = "one-sided"

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        return 0.5 * (np.maximum(self.z_scores(features), 0.0) ** 2).sum(axis=1)


class FullCovariance(ScoringRule):
    """−log N(f; μ, D R D), R the OAS-shrunk correlation of the kept features.

    Attributes (after fit): correlation_ (k, k) shrunk correlation, its lower Cholesky factor cholesky_,
    shrinkage_ in [0, 1].
    """

    name = "full-cov"

    def fit_stats(self, stats: FeatureStats) -> FullCovariance:
        super().fit_stats(stats)
        kept = self.kept_features_
        std = self.std_[kept]
        # MLE covariance of z (divided by n, as sklearn's OAS does)
        empirical = stats.comoment[np.ix_(kept, kept)] / np.outer(std, std) / stats.count
        self.shrinkage_ = oas_shrinkage(empirical, stats.count)
        target = np.trace(empirical) / len(empirical)
        self.correlation_ = (1 - self.shrinkage_) * empirical + self.shrinkage_ * target * np.eye(len(empirical))
        self.cholesky_ = scipy.linalg.cholesky(self.correlation_, lower=True)
        self._log_norm = (
            np.log(np.diag(self.cholesky_)).sum() + np.log(std).sum() + 0.5 * len(std) * math.log(2 * math.pi)
        )
        return self

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        z = self.z_scores(features)
        whitened = scipy.linalg.solve_triangular(self.cholesky_, z.T, lower=True)
        return 0.5 * (whitened**2).sum(axis=0) + self._log_norm


class FisherCombination(ScoringRule):
    """−2 Σₖ log pₖ over the parts' conformal p-values against held-out in-distribution rows (Fisher, 1925).

    Attributes (after fit and calibrate): parts_ (the fitted part rules), null_scores_ (part name →
    sorted scores of the calibration rows).
    """

    name = "combined"
    learns_from_calibration = True
    part_tails: ClassVar[dict[str, str]] = {"one-sided": "upper", "full-cov": "upper"}  # part → p-value tail

    def fit_stats(self, stats: FeatureStats) -> FisherCombination:
        super().fit_stats(stats)
        self.parts_ = [make_rule(name).fit_stats(stats) for name in self.part_tails]
        return self

    def calibrate(self, features: np.ndarray) -> FisherCombination:
        features = self._check(features)
        if len(features) == 0:
            raise ValueError(f"the {self.name} rule needs at least one calibration row")
        self.null_scores_ = {part.name: np.sort(part.ood_score(features)) for part in self.parts_}
        return self

    def calibration_state(self) -> dict[str, np.ndarray]:
        return dict(self.null_scores_)

    def load_calibration_state(self, arrays: dict[str, np.ndarray]) -> FisherCombination:
        self.null_scores_ = {name: arrays[name] for name in self.part_tails}
        return self

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        features = self._check(features)
        if not hasattr(self, "null_scores_"):
            raise RuntimeError(f"the {self.name} rule is not calibrated yet; call calibrate with held-out rows")
        p_values = [
            conformal_p_values(self.null_scores_[part.name], part.ood_score(features), self.part_tails[part.name])
            for part in self.parts_
        ]
        return -2.0 * np.sum(np.log(p_values), axis=0)


class TypicalFisherCombination(FisherCombination):
    """`combined` with `full-cov`'s p-value two-sided: a row too close to the mean is atypical too."""

    name = "combined-typical"
    part_tails: ClassVar[dict[str, str]] = {"one-sided": "upper", "full-cov": "two-sided"}


def conformal_p_values(null_scores: np.ndarray, scores: np.ndarray, tail: str = "upper") -> np.ndarray:
    """Conformal p-values of `scores` against sorted in-distribution `null_scores`.

    upper: (1 + #null at least as high) / (1 + #null); lower: the same with "at most";
    two-sided: min(1, 2·min(upper, lower)).
    """
    at_least = len(null_scores) - np.searchsorted(null_scores, scores, side="left")
    upper = (1.0 + at_least) / (1.0 + len(null_scores))
    if tail == "upper":
        return upper
    lower = (1.0 + np.searchsorted(null_scores, scores, side="right")) / (1.0 + len(null_scores))
    if tail == "lower":
        return lower
    if tail == "two-sided":
        return np.minimum(1.0, 2.0 * np.minimum(upper, lower))
    raise ValueError(f"tail must be 'upper', 'lower' or 'two-sided', got {tail!r}")


def oas_shrinkage(covariance: np.ndarray, n_samples: int) -> float:
    """Oracle Approximating Shrinkage intensity for an MLE covariance (Chen et al., 2010; sklearn's form)."""
    n_features = len(covariance)
    mu = np.trace(covariance) / n_features
    alpha = np.mean(covariance**2)
    numerator = alpha + mu**2
    denominator = (n_samples + 1) * (alpha - mu**2 / n_features)
    return 1.0 if denominator == 0 else float(min(numerator / denominator, 1.0))


DEFAULT_RULE = "combined"  # chosen by the study's criterion (docs/scoring-rules.md, docs/detection-study.md)

SCORING_RULES: dict[str, type[ScoringRule]] = {
    rule.name: rule
    for rule in (DiagonalGaussian, OneSided, FullCovariance, FisherCombination, TypicalFisherCombination)
}


def check_rule(name: str) -> str:
    """`name`, or a clear error when no rule has it."""
    if name not in SCORING_RULES:
        raise ValueError(f"rule must be one of {sorted(SCORING_RULES)}, got {name!r}")
    return name


def make_rule(name: str) -> ScoringRule:
    """A fresh, unfitted rule by name."""
    return SCORING_RULES[check_rule(name)]()
