"""Scoring rules: each one's fit and score, fitted alike from one pass or from merged shards."""

import numpy as np
import pytest
from sklearn.covariance import OAS

from fimood.method.baselines import TypicalityTest
from fimood.method.detector import DetectorArtifact, DetectorSettings, GradNormDetector
from fimood.method.scoring import (
    DEFAULT_RULE,
    SCORING_RULES,
    DiagonalGaussian,
    FisherCombination,
    FullCovariance,
    OneSided,
    TypicalFisherCombination,
    conformal_p_values,
    make_rule,
)
from fimood.method.statistics import FeatureStats


def correlated_features(rng: np.random.Generator, n: int, n_features: int = 6) -> np.ndarray:
    """Log-norm-like features that move together, as layers' gradient norms do."""
    shared = rng.normal(size=(n, 1))
    return -5 + 2 * shared + 0.5 * rng.normal(size=(n, n_features)) + np.arange(n_features)


def test_every_rule_is_registered_under_its_name_and_the_default_is_one_of_them():
    assert sorted(SCORING_RULES) == ["combined", "combined-typical", "full-cov", "one-sided", "paper"]
    assert all(make_rule(name).name == name for name in SCORING_RULES)
    assert DEFAULT_RULE in SCORING_RULES
    with pytest.raises(ValueError, match="rule must be one of"):
        make_rule("best")


@pytest.mark.parametrize("name", sorted(SCORING_RULES))
def test_a_rule_fitted_from_merged_shards_scores_like_one_fitted_on_all_rows(name):
    rng = np.random.default_rng(0)
    features = correlated_features(rng, 900)
    merged = FeatureStats.empty(6)
    for shard in np.array_split(features, [100, 101, 550]):  # uneven shards, one of a single row
        merged = merged.merge(FeatureStats.from_array(shard))
    held_out, test = correlated_features(rng, 100), correlated_features(rng, 50)
    from_shards = make_rule(name).fit_stats(merged).calibrate(held_out)
    from_all = make_rule(name).fit(features).calibrate(held_out)
    np.testing.assert_allclose(from_shards.ood_score(test), from_all.ood_score(test), rtol=1e-9)


@pytest.mark.parametrize("name", sorted(SCORING_RULES))
def test_each_rule_scores_one_value_per_row_and_refuses_before_fit_or_on_the_wrong_width(name):
    rule = make_rule(name)
    with pytest.raises(RuntimeError, match="not fitted"):
        rule.ood_score(np.zeros((1, 6)))
    rule.fit(correlated_features(np.random.default_rng(1), 200)).calibrate(np.zeros((5, 6)))
    assert rule.ood_score(np.zeros((3, 6))).shape == (3,)
    with pytest.raises(ValueError, match=r"expected features of shape \(n, 6\)"):
        rule.ood_score(np.zeros((3, 5)))


def test_the_paper_rule_is_the_negated_sum_of_independent_gaussian_log_densities():
    rng = np.random.default_rng(2)
    fit, test = rng.normal(3, 2, size=(500, 4)), rng.normal(size=(5, 4))
    mean, std = fit.mean(0), fit.std(0, ddof=1)
    expected = (0.5 * ((test - mean) / std) ** 2 + np.log(std) + 0.5 * np.log(2 * np.pi)).sum(1)
    np.testing.assert_allclose(DiagonalGaussian().fit(fit).ood_score(test), expected, rtol=1e-12)


def test_the_one_sided_rule_counts_only_larger_than_usual_gradients():
    rng = np.random.default_rng(3)
    rule = OneSided().fit(rng.normal(size=(1000, 4)))
    smaller, larger = rule.mean_ - 3 * rule.std_, rule.mean_ + 3 * rule.std_
    assert rule.ood_score(smaller[None])[0] == 0.0
    np.testing.assert_allclose(rule.ood_score(larger[None]), [4 * 0.5 * 9])
    paper = DiagonalGaussian().fit(rng.normal(size=(1000, 4)))
    assert paper.ood_score(smaller[None])[0] > paper.ood_score(paper.mean_[None])[0]  # the paper's rule is two-sided


def test_full_covariance_uses_sklearns_oas_shrinkage_on_standardised_features():
    rng = np.random.default_rng(4)
    features = correlated_features(rng, 300)
    rule = FullCovariance().fit(features)
    z = (features - rule.mean_) / rule.std_
    oas = OAS().fit(z)
    assert rule.shrinkage_ == pytest.approx(oas.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(rule.correlation_, oas.covariance_, rtol=1e-9, atol=1e-12)


def test_full_covariance_sees_a_row_that_breaks_the_layers_correlation():
    rng = np.random.default_rng(5)
    features = correlated_features(rng, 2000)
    typical, broken = features.mean(0).copy(), features.mean(0).copy()
    typical[:] += 1.0  # all layers larger together: common in-distribution
    broken[:3] += 1.0  # half the layers larger, half smaller: never seen
    broken[3:] -= 1.0
    full, paper = FullCovariance().fit(features), DiagonalGaussian().fit(features)
    assert full.ood_score(broken[None])[0] > full.ood_score(typical[None])[0]
    assert paper.ood_score(broken[None])[0] == pytest.approx(paper.ood_score(typical[None])[0], rel=1e-9)


def test_constant_features_are_dropped_by_every_rule():
    rng = np.random.default_rng(6)
    features = correlated_features(rng, 100)
    features[:, 2] = 1.5
    for name in SCORING_RULES:
        rule = make_rule(name).fit(features).calibrate(features[:20])
        assert rule.kept_features_.tolist() == [True, True, False, True, True, True]
        assert np.isfinite(rule.ood_score(features)).all()


@pytest.mark.parametrize("name", sorted(SCORING_RULES))
def test_a_saved_detector_keeps_its_rule_and_scores_the_same(name, tmp_path):
    rng = np.random.default_rng(7)
    fit, calibration, test = correlated_features(rng, 400), correlated_features(rng, 100), correlated_features(rng, 9)
    per_row = GradNormDetector(rule=name).fit(fit, calibration)
    detector = DetectorArtifact(
        model_uri="memory://model",
        model_sha256="cd" * 32,
        feature_names=[f"f{i}" for i in range(6)],
        settings=DetectorSettings(rule=name),
        by_group={1: per_row},
        typicality=TypicalityTest.from_entropy(1.0),
    )
    detector.save(str(tmp_path))
    loaded = DetectorArtifact.load(str(tmp_path)).by_group[1]
    assert loaded.rule == name and loaded.rule_.name == name
    np.testing.assert_allclose(loaded.ood_score(test), per_row.ood_score(test), rtol=1e-12)
    assert loaded.threshold_ == per_row.threshold_


def test_detector_settings_refuse_an_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of"):
        DetectorSettings(rule="nearest-neighbour")


def test_the_combined_rule_is_fishers_method_over_its_parts_calibrated_p_values():
    rng = np.random.default_rng(8)
    fit, held_out, test = correlated_features(rng, 500), correlated_features(rng, 199), correlated_features(rng, 7)
    rule = FisherCombination().fit(fit)
    with pytest.raises(RuntimeError, match="not calibrated"):
        rule.ood_score(test)
    rule.calibrate(held_out)
    expected = 0.0
    for part in (OneSided().fit(fit), FullCovariance().fit(fit)):
        null = part.ood_score(held_out)
        p = (1 + (null[None, :] >= part.ood_score(test)[:, None]).sum(1)) / 200
        expected = expected - 2 * np.log(p)
    np.testing.assert_allclose(rule.ood_score(test), expected, rtol=1e-12)
    both_high = rule.mean_ + 4 * rule.std_  # every layer larger together: one-sided's p-value is tiny
    assert rule.ood_score(both_high[None])[0] > np.quantile(rule.ood_score(held_out), 0.99)


def test_conformal_p_values_count_the_null_scores_in_the_asked_tail():
    null = np.array([1.0, 2.0, 2.0, 3.0])  # sorted, as the rules keep them
    scores = np.array([0.0, 2.0, 5.0])
    np.testing.assert_allclose(conformal_p_values(null, scores), [5 / 5, 4 / 5, 1 / 5])
    np.testing.assert_allclose(conformal_p_values(null, scores, "lower"), [1 / 5, 4 / 5, 5 / 5])
    np.testing.assert_allclose(conformal_p_values(null, scores, "two-sided"), [2 / 5, 1.0, 2 / 5])
    with pytest.raises(ValueError, match="tail must be"):
        conformal_p_values(null, scores, "left")


def test_combined_typical_is_fishers_method_with_full_covs_p_value_two_sided():
    rng = np.random.default_rng(10)
    fit, held_out, test = correlated_features(rng, 500), correlated_features(rng, 199), correlated_features(rng, 7)
    rule = TypicalFisherCombination().fit(fit).calibrate(held_out)
    one_sided, full = OneSided().fit(fit), FullCovariance().fit(fit)
    p_upper = (1 + (one_sided.ood_score(held_out)[None, :] >= one_sided.ood_score(test)[:, None]).sum(1)) / 200
    null, scores = full.ood_score(held_out), full.ood_score(test)
    p_high = (1 + (null[None, :] >= scores[:, None]).sum(1)) / 200
    p_low = (1 + (null[None, :] <= scores[:, None]).sum(1)) / 200
    p_two_sided = np.minimum(1, 2 * np.minimum(p_high, p_low))
    np.testing.assert_allclose(rule.ood_score(test), -2 * np.log(p_upper) - 2 * np.log(p_two_sided), rtol=1e-12)


def test_a_row_too_close_to_the_in_distribution_mean_is_atypical_only_for_combined_typical():
    rng = np.random.default_rng(11)
    fit, held_out = correlated_features(rng, 2000, n_features=40), correlated_features(rng, 999, n_features=40)
    mean_row = fit.mean(0)[None]  # in 40 dimensions no in-distribution row is this close to the mean
    typical = TypicalFisherCombination().fit(fit).calibrate(held_out)
    combined = FisherCombination().fit(fit).calibrate(held_out)
    assert typical.ood_score(mean_row)[0] > np.quantile(typical.ood_score(held_out), 0.95)
    assert combined.ood_score(mean_row)[0] < np.median(combined.ood_score(held_out))


def test_a_combined_detector_sets_its_threshold_on_rows_its_rule_did_not_learn_from():
    rng = np.random.default_rng(9)
    detector = GradNormDetector(rule="combined").fit(correlated_features(rng, 300), correlated_features(rng, 101))
    assert len(detector.rule_.null_scores_["one-sided"]) == 51 and len(detector.calibration_scores_) == 50
    with pytest.raises(ValueError, match="calibration needs at least 2 rows"):
        GradNormDetector(rule="combined").fit(correlated_features(rng, 300), correlated_features(rng, 1))
    paper = GradNormDetector(rule="paper").fit(correlated_features(rng, 300), correlated_features(rng, 101))
    assert len(paper.calibration_scores_) == 101  # a rule that learns nothing from them keeps every row
