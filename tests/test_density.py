"""The paper's density: mergeable statistics, dropped constant features, clamped log-norms."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fimood.method.features import log_sq_norms
from fimood.method.scoring import DiagonalGaussian
from fimood.method.statistics import LOG_SQ_NORM_FLOOR, FeatureStats


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_fitting_in_shards_and_merging_equals_one_fit(sizes, seed):
    rng = np.random.default_rng(seed)
    shards = [rng.normal(loc=5.0, scale=2.0, size=(n, 3)) for n in sizes]
    merged = FeatureStats.empty(3)
    for shard in shards:
        merged = merged.update(shard)
    whole = FeatureStats.from_array(np.concatenate(shards))
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-9)


def test_merge_is_numerically_stable_for_large_offsets():
    rng = np.random.default_rng(0)
    data = 1e8 + rng.normal(size=(10_000, 2))
    merged = FeatureStats.from_array(data[:5000]).merge(FeatureStats.from_array(data[5000:]))
    np.testing.assert_allclose(merged.std, data.std(axis=0, ddof=1), rtol=1e-6)


def test_score_is_the_sum_of_per_feature_gaussian_log_densities():
    rng = np.random.default_rng(1)
    fit, new = rng.normal(size=(200, 4)), rng.normal(size=(5, 4))
    density = DiagonalGaussian().fit(fit)
    expected = norm.logpdf(new, fit.mean(0), fit.std(0, ddof=1)).sum(1)
    np.testing.assert_allclose(density.score_samples(new), expected)


def test_zero_variance_features_are_dropped():
    rng = np.random.default_rng(2)
    fit = np.column_stack([rng.normal(size=50), np.full(50, 3.0), rng.normal(size=50)])
    density = DiagonalGaussian().fit(fit)
    assert density.kept_features_.tolist() == [True, False, True]
    assert np.isfinite(density.score_samples(np.array([[0.0, 100.0, 0.0]]))).all()


def test_all_constant_features_are_refused():
    with pytest.raises(ValueError, match="zero variance"):
        DiagonalGaussian().fit(np.ones((10, 2)))


def test_scoring_before_fit_or_with_wrong_width_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not fitted"):
        DiagonalGaussian().score_samples(np.zeros((1, 2)))
    density = DiagonalGaussian().fit(np.random.default_rng(0).normal(size=(10, 2)))
    with pytest.raises(ValueError, match=r"expected features of shape \(n, 2\), got \(1, 3\)"):
        density.score_samples(np.zeros((1, 3)))


def test_log_of_a_zero_norm_is_clamped_and_counted():
    features = log_sq_norms(np.array([[0.0, 1.0], [4.0, 1.0]]))
    assert features[0, 0] == LOG_SQ_NORM_FLOOR and np.isfinite(features).all()
    assert FeatureStats.from_array(features).n_at_floor.tolist() == [1, 0]
