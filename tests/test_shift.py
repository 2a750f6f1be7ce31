"""The monitor's statistics: valid when nothing moved (over calibration sets too), powerful when rows move,
mergeable summaries, and budgets that keep their promises."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from fimood.method.detector import GradNormDetector
from fimood.method.shift import (
    DEFAULT_REFERENCE_RISK,
    Evidence,
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


def correlated_rows(rng, n, shared=0.5, layers=6):
    """Layers whose norms move together, as gradient norms do: a `shared` part of each layer's variance."""
    return np.sqrt(1 - shared) * rng.normal(size=(n, layers)) + np.sqrt(shared) * rng.normal(size=(n, 1))


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
    assert 0.12 < tests.excess <= 0.2  # a lower bound: the night's and the calibration set's noise come off
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
    calibration, scores = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    reference, summary = reference_and_summary(rng, calibration, scores, np.zeros((200, 6)))
    expected = scipy.stats.mannwhitneyu(scores, calibration, method="asymptotic", use_continuity=False)
    tests = shift_tests(summary, reference)
    assert tests.auc == pytest.approx(expected.statistic / (200 * 300))
    assert tests.rank_p < 1e-6


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


def test_the_lifetime_budget_counts_nights_not_partitions():
    """A stream of 20 partitions a night waits N nights for a false alarm, not N/20: a night's e-value
    is the mean of its partitions' (an e-value whatever their dependence)."""
    rng = np.random.default_rng(14)
    budget = LifetimeBudget(nights=30)
    nights = [[Evidence(f"cam-{c}", p) for c, p in enumerate(rng.uniform(size=20))] for _ in range(6000)]
    _, flagged = budget.night_statistics(nights)
    assert sum(bool(night) for night in flagged) <= 6000 / 30 / (1 - budget.still_shifted_level)
    shifted = [[Evidence("cam-0", 1e-9), Evidence("cam-1", 0.5)]]
    assert budget.night_statistics(shifted)[1] == [[Evidence("cam-0", 1e-9)]]  # the partition that carries it


def test_the_nightly_budget_corrects_across_the_nights_partitions():
    tonight = [Evidence("a", 0.03), Evidence("b", 0.04)]
    assert NightlyBudget(0.05, "bonferroni").decide([], tonight).shifted == set()
    decision = NightlyBudget(0.05, "bh").decide([[Evidence("a", 1e-9)]], tonight)  # earlier nights do not count
    assert decision.shifted == {"a", "b"} and decision.statistics == {"a": 0.04, "b": 0.04}
    assert NightlyBudget(0.05).decide([], [Evidence("a", 1e-9, large=False)]).shifted == set()  # too small to flag


def test_the_lifetime_budget_decides_tonight_after_the_streams_earlier_nights():
    budget = LifetimeBudget(nights=100)
    quiet = [[Evidence(f"n{night}", 0.5)] for night in range(5)]
    path, flagged = budget.night_statistics([*quiet, [Evidence("tonight", 1e-6)]])
    decision = budget.decide(quiet, [Evidence("tonight", 1e-6)])
    assert decision.statistics == {"tonight": path[-1]} and decision.shifted == {e.partition for e in flagged[-1]}
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
    assert tests.layers_p < 1e-6 and tests.layer_p.min() > 0.05  # no layer alone passes Holm
    true_shift = np.sqrt(pattern @ np.linalg.solve(correlation, pattern))
    assert 0.05 < tests.mean_shift < true_shift  # a lower bound, the reference's own offset taken off


def deployment(rng, references=100, nights=150, night_rows=1000, fit_rows=600, calibration_rows=300, layers=12):
    """Deploy `references` references, each fitted as `fimood fit` fits one (the default rule, its
    calibration split) on Gaussian features whose layers move together, and test `nights` fresh
    shift-free nights of `night_rows` rows against each: (references, nights) p-values and gates."""
    names = [f"layer{i}" for i in range(layers)]
    p_values, large = np.ones((references, nights)), np.zeros((references, nights), bool)
    for r in range(references):
        detector = GradNormDetector().fit(
            correlated_rows(rng, fit_rows, layers=layers), correlated_rows(rng, calibration_rows, layers=layers)
        )
        reference = Reference.of(detector, names)
        rows = correlated_rows(rng, nights * night_rows, layers=layers)
        scores, z = detector.ood_score(rows), detector.z_scores(rows)
        for night in range(nights):
            part = slice(night * night_rows, (night + 1) * night_rows)
            summary = PartitionSummary.from_rows(
                detector.calibration_scores_, scores[part], z[part], [None] * night_rows
            )
            tests = shift_tests(summary, reference)
            p_values[r, night], large[r, night] = tests.p_value, tests.large(0.01, 0.1)
    return p_values, large


DEPLOYED_ALPHA, NIGHTS_PER_FALSE_ALARM = 0.05, 30


def false_alarms_of_deployments(p_values, large):
    """Per reference: its share of flagged nights at DEPLOYED_ALPHA, and its lifetime alarms per N nights."""
    rates = ((p_values <= DEPLOYED_ALPHA) & large).mean(axis=1)
    budget = LifetimeBudget(NIGHTS_PER_FALSE_ALARM)
    alarms = np.array([sum(budget.statistics(list(p), list(g))[1]) for p, g in zip(p_values, large, strict=True)])
    return rates, alarms * NIGHTS_PER_FALSE_ALARM / p_values.shape[1]


def test_one_deployed_reference_keeps_every_nights_level_and_the_lifetime_budget():
    """The way a deployment runs: one reference, fresh nights against it for months. Nights of 500 rows
    against 150 calibration scores and 600 fit rows, so the reference's own error dominates; over 100
    references, at most δ = 5% of them may have a per-night false-alarm rate above 2α, and the lifetime
    budget (one false alarm per N nights in expectation) holds on average over them."""
    p_values, large = deployment(np.random.default_rng(11), 100, 120, 500)
    rates, alarms_per_n = false_alarms_of_deployments(p_values, large)
    assert (rates > 2 * DEPLOYED_ALPHA).mean() <= DEFAULT_REFERENCE_RISK
    assert alarms_per_n.mean() + 3 * alarms_per_n.std() / np.sqrt(len(alarms_per_n)) <= 1 / (1 - 0.01)
    # the p-values alone, without the gates: no more references above Binomial(120, α)'s 99th percentile than δ
    ungated = (p_values <= DEPLOYED_ALPHA).sum(axis=1)
    assert (ungated > scipy.stats.binom.ppf(0.99, 120, DEPLOYED_ALPHA)).mean() <= DEFAULT_REFERENCE_RISK + 0.01


def test_the_deployed_reference_would_raise_false_alarms_night_after_night_if_its_error_were_ignored(monkeypatch):
    """The control: the same deployments with each test's allowance for the reference's error taken out."""
    monkeypatch.setattr(Reference, "rate_bound", property(lambda reference: reference.expected_rate))
    monkeypatch.setattr(Reference, "rank_bound", property(lambda reference: 0.0))
    monkeypatch.setattr(Reference, "offset_bound", property(lambda reference: 0.0))
    rates, alarms_per_n = false_alarms_of_deployments(*deployment(np.random.default_rng(11), 20, 120, 500))
    assert (rates > 2 * DEPLOYED_ALPHA).mean() > 0.25 and alarms_per_n.mean() > 1


def test_the_guarantee_says_when_the_reference_dominates_and_what_a_night_must_show():
    rng = np.random.default_rng(12)
    reference, _ = reference_and_summary(rng, rng.normal(size=500), rng.normal(size=10), rng.normal(size=(10, 6)))
    small, large = (reference.guarantee(rows, 0.01, "a night's p ≤ 0.01", 0.01, 0.1) for rows in (200, 50_000))
    assert not small.reference_dominates and large.reference_dominates
    assert large.detectable_rate_excess < small.detectable_rate_excess  # more rows help, down to the allowance
    assert large.detectable_rate_excess > large.rate_allowance > 0
    assert large.detectable_mean_shift > np.sqrt(reference.offset_bound / reference.n_fit)
    assert "95%" in str(large) and "0.01" in str(large) and large.promise in str(large)
    with pytest.raises(ValueError, match="risk"):
        Reference(500, 24, 5000, LAYERS, np.eye(6), risk=0.0)


@pytest.mark.parametrize("change", ["spread", "correlation"])
def test_a_change_of_the_layers_spread_or_correlation_with_the_means_kept_is_caught_by_the_scores(change):
    """The layer test sees means; the default rule's score sees each row's distance in the layers' joint
    distribution, so the rank test of the scores sees a spread or a correlation change."""
    rng = np.random.default_rng(13)
    detector = GradNormDetector().fit(correlated_rows(rng, 4000), correlated_rows(rng, 1000))
    night = correlated_rows(rng, 2000) * 1.3 if change == "spread" else correlated_rows(rng, 2000, shared=0.0)
    summary = PartitionSummary.from_rows(
        detector.calibration_scores_, detector.ood_score(night), detector.z_scores(night), [None] * 2000
    )
    tests = shift_tests(summary, Reference.of(detector, LAYERS))
    assert tests.layers_p > 0.01 and tests.rank_p < 1e-6 and tests.large(0.01, 0.1)
