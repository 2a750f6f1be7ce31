"""The fit reduce: the same detector whatever the batching and order, with a bounded calibration sample."""

import numpy as np
import pytest

from fimood.method.detector import GradNormDetector
from fimood.method.reduce import FitReduce
from fimood.method.splits import split_hash


def _rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"row-{i}" for i in range(n)]
    return ids, rng.normal(size=(n, 4)) + np.arange(4), rng.normal(size=n)


def _feed(reduce: FitReduce, ids, features, nll, batch: int, order: np.ndarray) -> FitReduce:
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        reduce.add([ids[i] for i in rows], features[rows], nll[rows])
    return reduce


def test_batching_and_order_do_not_change_the_fit():
    ids, features, nll = _rows(600)
    one, _ = _feed(FitReduce(4, 0.2), ids, features, nll, 600, np.arange(600)).finish(0.05)
    many, typicality = _feed(
        FitReduce(4, 0.2), ids, features, nll, 7, np.random.default_rng(1).permutation(600)
    ).finish(0.05)
    hashes = split_hash(ids)
    calibration = np.flatnonzero(hashes < 0.2)
    calibration = calibration[np.argsort(hashes[calibration])]  # the reduce keeps its sample in hash order
    direct = GradNormDetector().fit(features[hashes >= 0.2], features[calibration])
    new = _rows(20, seed=2)[1]
    for detector in (one, many):
        np.testing.assert_allclose(detector.ood_score(new), direct.ood_score(new), rtol=1e-10)
        assert detector.threshold_ == pytest.approx(direct.threshold_, rel=1e-10)
    assert typicality.entropy_ == pytest.approx(nll[hashes >= 0.2].mean())


def test_calibration_sample_is_bounded_to_the_smallest_hashes_and_the_rest_join_the_fit_in_any_order():
    ids, features, nll = _rows(2000)
    fits = [
        _feed(FitReduce(4, 0.5, max_calibration_rows=50), ids, features, nll, 16, order).finish(0.05, "paper")[0]
        for order in (np.arange(2000), np.random.default_rng(3).permutation(2000))
    ]
    hashes = split_hash(ids)
    smallest = np.argsort(hashes)[:50]
    rest = np.setdiff1d(np.arange(2000), smallest)  # the fit rows and the calibration rows past the cap
    expected = np.sort(GradNormDetector(rule="paper").fit(features[rest]).ood_score(features[smallest]))
    for fit in fits:
        assert len(fit.calibration_scores_) == 50 and fit.stats_.count == 1950
        np.testing.assert_allclose(fit.calibration_scores_, expected, rtol=1e-10)


def test_streaming_memory_stays_within_its_bound_whatever_the_rows():
    """The reduce's peak (tracemalloc) is under `memory_bound_bytes` and does not grow with the rows streamed."""
    from fimood.research.benchmark import run_reduce_benchmark

    runs = [run_reduce_benchmark(rows, 40, 2000, 0.5, 512) for rows in (20_000, 80_000)]
    for run in runs:
        assert run.calibration_rows == 2000 and run.streaming_peak_mib <= run.bound_mib
    assert runs[1].streaming_peak_mib <= 1.1 * runs[0].streaming_peak_mib


def test_too_few_rows_is_a_clear_error():
    ids, features, nll = _rows(1)
    with pytest.raises(ValueError, match="need at least 2 fit rows and 1 calibration row"):
        _feed(FitReduce(4, 0.2), ids, features, nll, 1, np.arange(1)).finish(0.05)


@pytest.mark.parametrize("cap", [1_000, 50])  # every calibration row kept; the cap reached in every partial
def test_partials_merged_in_any_tree_give_the_fit_of_one_reduce(cap):
    """Ray tasks reduce disjoint rows into partials, passed as bytes and merged in any grouping: the same
    detector and calibration sample as one reduce over all rows."""
    ids, features, nll = _rows(900)
    one, one_typicality = _feed(FitReduce(4, 0.2, cap), ids, features, nll, 900, np.arange(900)).finish(0.05)
    order, partials = np.random.default_rng(3).permutation(900), []
    for start in range(0, 900, 100):
        rows = order[start : start + 100]
        partial = _feed(FitReduce(4, 0.2, cap), ids, features, nll, 30, rows)
        partials.append(FitReduce.from_bytes(partial.to_bytes()))
    left = partials[0].merge(partials[1]).merge(partials[2])
    right = partials[3]
    for partial in partials[4:]:
        right = right.merge(partial)
    merged = FitReduce.from_bytes(left.to_bytes()).merge(FitReduce.from_bytes(right.to_bytes()))
    in_calibration = int((split_hash(ids) < 0.2).sum())
    assert merged.stats.count + merged.calibration_rows == 900 and merged.calibration_rows == min(cap, in_calibration)
    detector, typicality = merged.finish(0.05)
    new = _rows(20, seed=2)[1]
    np.testing.assert_allclose(detector.ood_score(new), one.ood_score(new), rtol=1e-9)
    assert detector.threshold_ == pytest.approx(one.threshold_, rel=1e-9)
    assert typicality.entropy_ == pytest.approx(one_typicality.entropy_, rel=1e-12)
