"""The paper's density over log gradient norms, fitted from mergeable sufficient statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# log ‖g‖² is clamped here instead of becoming -inf; rows at the floor are counted per feature.
LOG_SQ_NORM_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class FeatureStats:
    """Count, mean and sum of squared deviations (M2) per feature: mergeable across shards.

    `merge` is Chan et al.'s parallel update, so statistics merged from many workers equal those
    of one pass over all rows (up to float rounding).
    """

    count: int
    mean: np.ndarray  # (L,)
    m2: np.ndarray  # (L,)
    n_at_floor: np.ndarray  # (L,) rows whose log-norm was clamped to LOG_SQ_NORM_FLOOR

    @classmethod
    def empty(cls, n_features: int) -> FeatureStats:
        zeros = np.zeros(n_features)
        return cls(0, zeros, zeros.copy(), np.zeros(n_features, dtype=np.int64))

    @classmethod
    def from_array(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of a (n, L) feature array."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (n_samples, n_features), got {features.shape}")
        if len(features) == 0:
            return cls.empty(features.shape[1])
        mean = features.mean(axis=0)
        return cls(
            count=len(features),
            mean=mean,
            m2=((features - mean) ** 2).sum(axis=0),
            n_at_floor=(features <= LOG_SQ_NORM_FLOOR).sum(axis=0).astype(np.int64),
        )

    def merge(self, other: FeatureStats) -> FeatureStats:
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge statistics of {self.mean.shape[0]} and {other.mean.shape[0]} features")
        count = self.count + other.count
        if count == 0:
            return self
        delta = other.mean - self.mean
        return FeatureStats(
            count=count,
            mean=self.mean + delta * (other.count / count),
            m2=self.m2 + other.m2 + delta**2 * (self.count * other.count / count),
            n_at_floor=self.n_at_floor + other.n_at_floor,
        )

    def update(self, features: np.ndarray) -> FeatureStats:
        """These statistics merged with those of a (n, L) batch of features."""
        return self.merge(FeatureStats.from_array(features))

    @property
    def std(self) -> np.ndarray:
        """Unbiased standard deviation per feature, shape (L,)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a standard deviation, got {self.count}")
        return np.sqrt(np.maximum(self.m2, 0.0) / (self.count - 1))


class DiagonalGaussian:
    """Independent 1-D Gaussian per feature; features with zero variance are dropped.

    Attributes (after fit): mean_, std_ (L,), kept_features_ (L,) bool, n_features_in_,
    n_samples_fit_.

    Examples:
        >>> density = DiagonalGaussian().fit(np.random.default_rng(0).normal(size=(100, 3)))
        >>> density.score_samples(np.zeros((2, 3))).shape
        (2,)
    """

    def fit(self, features: np.ndarray) -> DiagonalGaussian:
        """Fit on (n_samples, n_features) log-norm features."""
        return self.fit_stats(FeatureStats.from_array(features))

    def fit_stats(self, stats: FeatureStats) -> DiagonalGaussian:
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

    def score_samples(self, features: np.ndarray) -> np.ndarray:
        """Σ_ℓ log N(f_ℓ; μ_ℓ, σ_ℓ) over kept features (paper eq. for the joint density), shape (n,)."""
        features = self._check(features)
        mean, std = self.mean_[self.kept_features_], self.std_[self.kept_features_]
        z = (features[:, self.kept_features_] - mean) / std
        return (-0.5 * z**2 - np.log(std) - 0.5 * math.log(2 * math.pi)).sum(axis=1)

    def z_scores(self, features: np.ndarray) -> np.ndarray:
        """(f - μ)/σ per kept feature, shape (n, n_kept)."""
        features = self._check(features)
        return (features[:, self.kept_features_] - self.mean_[self.kept_features_]) / self.std_[self.kept_features_]

    def _check(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise RuntimeError("this DiagonalGaussian is not fitted yet; call fit or fit_stats first")
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.n_features_in_:
            raise ValueError(f"expected features of shape (n, {self.n_features_in_}), got {features.shape}")
        return features
