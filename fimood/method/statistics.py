"""Mergeable sufficient statistics of log gradient-norm features, from which every scoring rule is fitted."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# log ‖g‖² is clamped here instead of becoming -inf; rows at the floor are counted per feature.
LOG_SQ_NORM_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class FeatureStats:
    """Count, mean and co-moment matrix (sum of outer products of deviations): mergeable across shards.

    `merge` is Chan et al.'s parallel update, so statistics merged from many workers equal those
    of one pass over all rows (up to float rounding).
    """

    count: int
    mean: np.ndarray  # (L,)
    comoment: np.ndarray  # (L, L): Σ_i (f_i − mean)(f_i − mean)ᵀ
    n_at_floor: np.ndarray  # (L,) rows whose log-norm was clamped to LOG_SQ_NORM_FLOOR

    @classmethod
    def empty(cls, n_features: int) -> FeatureStats:
        return cls(0, np.zeros(n_features), np.zeros((n_features, n_features)), np.zeros(n_features, dtype=np.int64))

    @classmethod
    def from_array(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of a (n, L) feature array."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (n_samples, n_features), got {features.shape}")
        if len(features) == 0:
            return cls.empty(features.shape[1])
        mean = features.mean(axis=0)
        deviations = features - mean
        return cls(
            count=len(features),
            mean=mean,
            comoment=deviations.T @ deviations,
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
            comoment=self.comoment + other.comoment + np.outer(delta, delta) * (self.count * other.count / count),
            n_at_floor=self.n_at_floor + other.n_at_floor,
        )

    def update(self, features: np.ndarray) -> FeatureStats:
        """These statistics merged with those of a (n, L) batch of features."""
        return self.merge(FeatureStats.from_array(features))

    @property
    def m2(self) -> np.ndarray:
        """Sum of squared deviations per feature, shape (L,)."""
        return np.diag(self.comoment).copy()

    @property
    def std(self) -> np.ndarray:
        """Unbiased standard deviation per feature, shape (L,)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a standard deviation, got {self.count}")
        return np.sqrt(np.maximum(self.m2, 0.0) / (self.count - 1))
