"""The monitor's statistics: valid when nothing moved (over calibration sets too), powerful when rows move,
mergeable summaries, and budgets that keep their promises."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from fimood.method.shift import (
    LifetimeBudget,
    NightlyBudget,
    PartitionSummary,
    Reference,
    benjamini_hochberg,
    e_value,
    excess_share,
    holm,
    shift_tests,
)

LAYERS = [f"layer{i}" for i in range(6)]


def reference_and_summary(rng, calibration, scores, z, n_fit=5000, rate=0.05, correlation=None):
    """A reference with a 5% threshold over sorted `calibration` and the layers' `correlation` (default:
    independent layers, estimated from n_fit rows), and the summary of `scores`, `z`."""
    calibration = np.sort(calibration)
    threshold = np.quantile(calibration, 1 - rate, method="higher")
    if correlation is None:
        correlation = np.corrcoef(rng.normal(size=(n_fit, len(LAYERS))), rowvar=False)
    reference = Reference(len(calibration), int((calibration > threshold).sum()), n_fit, LAYERS, correlation)
    summary = PartitionSummary.from_rows(calibration, scores, z, [None] * len(scores))
    return reference, summary


def correlated_rows(rng, n, shared=0.5):
    """Layers whose norms move together, as gradient norms do: a `shared` part of each layer's variance."""
    return np.sqrt(1 - shared) * rng.normal(size=(n, len(LAYERS))) + np.sqrt(shared) * rng.normal(size=(n, 1))


def null_night(rng, m=500, n=1000, n_fit=5000):
    """Calibration, partition and layers all from the reference; the layers' mean, spread and correlation
    estimated from n_fit rows, as a fit does."""
    fit = correlated_rows(rng, n_fit)
    z = (correlated_rows(rng, n) - fit.mean(axis=0)) / fit.std(axis=0, ddof=1)
    correlation = np.corrcoef(fit, rowvar=False)
    return reference_and_summary(rng, rng.normal(size=m), rng.normal(size=n), z, n_fit, correlation=correlation)


def test_each_test_keeps_its_level_over_calibration_sets_when_nothing_moved():
    rng = np.random.default_rng(0)
    rejections = np.array(
        [
            [p <= 0.05 for p in (t.rate_p, t.rank_p, t.layers_p, t.p_value)]
            for t in (shift_tests(s, r) for r, s in (null_night(rng) for _ in range(400)))
        ]
    )
    upper = scipy.stats.binom.ppf(0.999, 400, 0.05) / 400  # 0.05 plus sampling noise
    assert (rejections.mean(axis=0) <= upper).all(), rejections.mean(axis=0)


def test_a_plain_binomial_would_not_keep_the_level_with_a_small_calibration_set():
    """Why the rate test is beta-binomial: with m = 100 calibration rows the true rate of a threshold
    varies from set to set, and a night of 5,000 rows sees it."""
    rng = np.random.default_rng(1)
    binomial, beta_binomial = [], []
    for _ in range(300):
        reference, summary = reference_and_summary(
            rng, rng.normal(size=100), rng.normal(size=5000), np.zeros((5000, len(LAYERS)))
        )
        tests = shift_tests(summary, reference)
        binomial.append(scipy.stats.binomtest(tests.flagged, 5000, reference.expected_rate, "greater").pvalue <= 0.05)
        beta_binomial.append(tests.rate_p <= 0.05)
    assert np.mean(binomial) > 0.2 and np.mean(beta_binomial) <= 0.08


def test_ood_rows_raise_the_rate_and_the_rank_statistic_and_the_excess():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.normal(size=800), rng.normal(4, 1, size=200)])  # 20% far above the reference
    reference, summary = reference_and_summary(rng, rng.normal(size=2000), scores, rng.normal(size=(1000, 6)))
    tests = shift_tests(summary, reference)
    assert tests.rate_p < 1e-20 and tests.rank_p < 1e-10 and tests.auc > 0.55
    assert tests.excess_rate_ci[0] > 0.1 and tests.ood_rate == pytest.approx(0.05 * 0.8 + 0.2, abs=0.04)
    assert tests.excess == pytest.approx(0.2, abs=0.04)
    assert tests.layers_p > 0.05 and tests.top_layers == []


def test_the_layers_that_moved_are_named_largest_first():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(1000, 6))
    z[:, 4] += 0.5
    z[:, 1] -= 0.2
    reference, summary = reference_and_summary(rng, rng.normal(size=500), rng.normal(size=1000), z)
    tests = shift_tests(summary, reference)
    assert tests.top_layers == ["layer4", "layer1"]
    assert tests.layers_p < 1e-20 and tests.p_value == pytest.approx(3 * tests.layers_p)


def test_summaries_merge_to_the_summary_of_all_rows():
    rng = np.random.default_rng(4)
    calibration = np.sort(rng.normal(size=50))
    scores, z = rng.normal(size=300), rng.normal(size=(300, 6))
    errors = [None] * 300 + ["image is missing"] * 3
    whole = PartitionSummary.from_rows(calibration, scores, z, errors)
    halves = PartitionSummary.from_rows(calibration, scores[:100], z[:100], errors[:100]).merge(
        PartitionSummary.from_rows(calibration, scores[100:], z[100:], errors[100:])
    )
    assert whole.rows == halves.rows == 303 and whole.scored == 300
    assert halves.errors_by_reason == {"image is missing": 3}
    np.testing.assert_array_equal(whole.rank_counts, halves.rank_counts)
    np.testing.assert_allclose(whole.z_sum, halves.z_sum)
    np.testing.assert_allclose(whole.z_sq_sum, halves.z_sq_sum)


def test_the_rank_statistic_is_mann_whitney_u():
    rng = np.random.default_rng(5)
    calibration, scores = rng.normal(size=300), rng.normal(0.3, 1, size=200)
    reference, summary = reference_and_summary(rng, calibration, scores, np.zeros((200, 6)))
    expected = scipy.stats.mannwhitneyu(scores, calibration, method="asymptotic", use_continuity=False)
    tests = shift_tests(summary, reference)
    assert tests.auc == pytest.approx(expected.statistic / (200 * 300))
    assert tests.rank_p == pytest.approx(expected.pvalue, rel=1e-6)


def test_rows_unusually_typical_count_as_excess_too():
    rng = np.random.default_rng(6)
    calibration = np.sort(rng.normal(size=2000))
    scores = np.concatenate([rng.normal(size=700), np.full(300, calibration.min() - 1)])  # 30% below every score
    assert excess_share(PartitionSummary.from_rows(calibration, scores, np.zeros((1000, 1)), [None] * 1000)) > 0.25


def test_holm_and_benjamini_hochberg_match_worked_examples():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])


def test_e_values_average_at_most_one_under_the_null():
    mean, _ = scipy.integrate.quad(lambda log_p: e_value(np.exp(log_p)) * np.exp(log_p), -700, 0, limit=500)
    assert mean + 1 / 700 == pytest.approx(1.0, abs=1e-4)  # E[e(U)], U uniform; below p = e^-700 lies 1/700
    assert e_value(1e-8) > 365 and e_value(0.5) < 1


def test_the_lifetime_budget_waits_at_least_n_nights_on_average_for_a_false_alarm():
    rng = np.random.default_rng(7)
    budget = LifetimeBudget(nights=30)
    alarms = 0
    nights = 30_000
    _, flags = budget.statistics(list(rng.uniform(size=nights)))
    alarms = sum(flags)
    assert alarms <= nights / 30 / (1 - budget.still_shifted_level)  # at most ~one false alarm per 30 nights


def test_the_lifetime_budget_flags_a_lasting_shift_every_night_until_it_ends():
    budget = LifetimeBudget(nights=365)
    path, flags = budget.statistics([0.5] * 5 + [1e-4] * 2 + [1e-3] * 3 + [0.5] * 3 + [1e-3])
    assert flags == [False] * 5 + [False, True] + [True] * 3 + [False] * 4  # evidence adds up, then stays on
    assert path[7] < path[6]  # R starts again after the alarm
    _, flags = budget.statistics([1e-4] * 2 + [1e-3], allowed=[True, False, True])
    assert flags == [False, False, True]  # a night whose effect is too small is not flagged; its evidence counts


def test_the_nightly_budget_corrects_across_the_nights_partitions():
    assert NightlyBudget(0.05, "bonferroni").significant([0.03, 0.04]) == [False, False]
    assert NightlyBudget(0.05, "bh").significant([0.03, 0.04]) == [True, True]
    with pytest.raises(ValueError, match="correction"):
        NightlyBudget(0.05, "sidak")


def test_a_huge_partition_with_a_negligible_change_is_significant_but_not_large():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(200_000, 6)) + 0.03  # every layer a thirtieth of a standard deviation up
    reference, summary = reference_and_summary(rng, rng.normal(size=2000), rng.normal(size=200_000), z, n_fit=10**6)
    tests = shift_tests(summary, reference)
    assert tests.p_value < 1e-10 and not tests.large(min_excess=0.01, min_mean_shift=0.1)
    assert tests.mean_shift == pytest.approx(0.03 * np.sqrt(6), abs=0.01)
    z[:, 2] += 0.2  # one layer's mean moves by a fifth of its spread: worth an alarm
    tests = shift_tests(
        PartitionSummary.from_rows(np.sort(rng.normal(size=2000)), rng.normal(size=200_000), z, [None] * 200_000),
        reference,
    )
    assert tests.large(min_excess=0.01, min_mean_shift=0.1) and tests.top_layers[0] == "layer2"


def test_a_small_move_of_every_layer_is_caught_by_the_layers_mean_where_no_layer_alone_is():
    """Norms move together in distribution; a night whose layers all move a little *against* that
    pattern is far from the reference in Mahalanobis terms, though each layer alone is within noise."""
    rng = np.random.default_rng(9)
    fit = correlated_rows(rng, 5000, shared=0.9)
    pattern = np.array([1, -1, 1, -1, 1, -1]) * 0.03
    z = (correlated_rows(rng, 2000, shared=0.9) + pattern - fit.mean(axis=0)) / fit.std(axis=0, ddof=1)
    correlation = np.corrcoef(fit, rowvar=False)
    scores = rng.normal(size=2000)
    reference, summary = reference_and_summary(rng, rng.normal(size=500), scores, z, 5000, 0.05, correlation)
    tests = shift_tests(summary, reference)
    assert tests.layers_p < 1e-8 and tests.layer_p.min() > 0.05  # no layer alone passes Holm
    assert tests.mean_shift == pytest.approx(np.sqrt(pattern @ np.linalg.solve(correlation, pattern)), abs=0.05)
