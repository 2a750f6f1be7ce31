"""The monitor study's rival shift tests: each keeps its level on shift-free nights, catches a clear shift,
computes what its docstring says, and refuses arrays of the wrong shape; the classifier they read learns."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from fimood.onboarding.datasets import load_source
from fimood.research.monitor_rivals import (
    BBSD,
    MMDDrift,
    PixelPCAHotelling,
    TypicalityBatchTest,
    classifier_outputs,
    train_classifier,
)

LEVEL = 0.05


def rejection_share(p_values) -> float:
    return float(np.mean(np.asarray(p_values) <= LEVEL))


def binomial_margin(trials: int) -> float:
    """Three standard deviations of a rejection share at LEVEL over `trials` independent nights."""
    return 3 * np.sqrt(LEVEL * (1 - LEVEL) / trials)


# --- Typicality -------------------------------------------------------------------------------------------


def test_typicality_keeps_its_level_on_null_nights_small_against_the_calibration_set():
    rng = np.random.default_rng(0)
    p_values = []
    for night in range(400):
        test = TypicalityBatchTest(seed=night).fit(rng.normal(size=400), rng.normal(size=500))
        p_values.append(test.p_value(rng.normal(size=20)))
    assert abs(rejection_share(p_values) - LEVEL) <= binomial_margin(400)


def test_typicality_flags_nights_whose_nll_is_too_high_and_too_low():
    rng = np.random.default_rng(1)
    test = TypicalityBatchTest().fit(rng.normal(size=400), rng.normal(size=500))
    smallest = 1 / (test.n_bootstrap + 1)
    assert test.p_value(rng.normal(0.5, size=100)) == smallest
    assert test.p_value(rng.normal(-0.5, size=100)) == smallest  # more typical than typical (MNIST under Glow)
    assert test.p_value(rng.normal(size=100)) > 0.01


def test_typicality_resolution_is_one_over_bootstraps_plus_one():
    rng = np.random.default_rng(2)
    test = TypicalityBatchTest(n_bootstrap=99).fit(rng.normal(size=400), rng.normal(size=500))
    assert test.p_value(np.full(30, 100.0)) == pytest.approx(0.01)
    assert test.p_value(np.full(30, test.entropy_)) == 1.0


def test_typicality_bootstraps_once_per_night_size_and_again_after_a_refit(monkeypatch):
    rng = np.random.default_rng(3)
    test = TypicalityBatchTest(n_bootstrap=200).fit(rng.normal(size=400), rng.normal(size=500))
    sizes = []
    real_bootstrap = test._bootstrap
    monkeypatch.setattr(test, "_bootstrap", lambda n: sizes.append(n) or real_bootstrap(n))
    nights = [rng.normal(size=n) for n in (50, 50, 80, 50, 80, 80)]
    first = [test.p_value(night) for night in nights]
    assert sizes == [50, 80]
    assert [test.p_value(night) for night in nights] == first  # a night's p-value does not depend on the order
    assert sizes == [50, 80]
    test.fit(rng.normal(size=400), rng.normal(size=500))
    test.p_value(nights[0])
    assert sizes == [50, 80, 50]


def test_typicality_bootstrap_is_seeded_by_seed_and_night_size():
    rng = np.random.default_rng(4)
    fit_nll, calibration_nll = rng.normal(size=400), rng.normal(size=500)
    one = TypicalityBatchTest(seed=7).fit(fit_nll, calibration_nll)
    one.null_statistics(30)
    two = TypicalityBatchTest(seed=7).fit(fit_nll, calibration_nll)
    np.testing.assert_array_equal(one.null_statistics(40), two.null_statistics(40))
    other = TypicalityBatchTest(seed=8).fit(fit_nll, calibration_nll)
    assert not np.array_equal(one.null_statistics(40), other.null_statistics(40))


def test_typicality_refuses_wrong_shapes_and_use_before_fit():
    rng = np.random.default_rng(5)
    with pytest.raises(RuntimeError, match="call fit"):
        TypicalityBatchTest().p_value(rng.normal(size=10))
    with pytest.raises(ValueError, match="fit_nll must have 1 dimension"):
        TypicalityBatchTest().fit(rng.normal(size=(400, 2)), rng.normal(size=500))
    with pytest.raises(ValueError, match="calibration_nll needs at least 2"):
        TypicalityBatchTest().fit(rng.normal(size=400), rng.normal(size=1))
    test = TypicalityBatchTest().fit(rng.normal(size=400), rng.normal(size=500))
    with pytest.raises(ValueError, match="night_nll must have 1 dimension"):
        test.p_value(rng.normal(size=(10, 1)))
    with pytest.raises(ValueError, match="night_nll needs at least 1"):
        test.p_value(np.array([]))
    with pytest.raises(ValueError, match="non-finite"):
        test.p_value(np.array([1.0, np.nan]))


# --- Hotelling's T² on pixel PCs ----------------------------------------------------------------------------


def pixel_like_rows(rng, n, rotation, shift=None):
    """Gaussian rows with a decaying spectrum in a random basis, as pixels' is (64 values, an 8×8 image)."""
    rows = (rng.normal(size=(n, 64)) / np.arange(1, 65)) @ rotation
    if shift is not None:
        rows = rows + shift
    return rows


def test_pixel_hotelling_keeps_its_level_on_null_nights_larger_than_the_fit_set():
    # Nights of 600 rows against 300 fit rows: without the fitted mean's error (1/n_fit) T² would be 3× too big.
    rng = np.random.default_rng(10)
    p_values = []
    for _ in range(300):
        rotation = np.linalg.qr(rng.normal(size=(64, 64)))[0]
        test = PixelPCAHotelling(n_components=10).fit(pixel_like_rows(rng, 300, rotation))
        p_values.append(test.p_value(pixel_like_rows(rng, 600, rotation)))
    assert abs(rejection_share(p_values) - LEVEL) <= binomial_margin(300)


def test_pixel_hotelling_is_the_two_sample_t_squared_with_the_fit_covariance_referred_to_f():
    rng = np.random.default_rng(11)
    rotation = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    fit_rows, night = pixel_like_rows(rng, 300, rotation), pixel_like_rows(rng, 120, rotation, shift=0.01)
    k, n_fit, n = 10, 300, 120
    test = PixelPCAHotelling(n_components=k).fit(fit_rows)
    # Brute force: the top-k eigenvectors of the fit rows' covariance, the scores' covariance inverted.
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(fit_rows, rowvar=False))
    directions = eigenvectors[:, np.argsort(eigenvalues)[::-1][:k]]
    scores = (fit_rows - fit_rows.mean(axis=0)) @ directions
    gap = (night.mean(axis=0) - fit_rows.mean(axis=0)) @ directions
    t_squared = n * n_fit / (n + n_fit) * gap @ np.linalg.inv(np.cov(scores, rowvar=False)) @ gap
    assert test.statistic(night) == pytest.approx(t_squared, rel=1e-8)
    f_statistic = (n_fit - k) / (k * (n_fit - 1)) * t_squared
    assert test.p_value(night) == pytest.approx(scipy.stats.f.sf(f_statistic, k, n_fit - k), rel=1e-6)


def test_pixel_hotelling_catches_a_shift_of_a_few_pixels_in_images():
    rng = np.random.default_rng(12)
    rotation = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    fit_images = pixel_like_rows(rng, 500, rotation).reshape(500, 1, 8, 8)
    test = PixelPCAHotelling(n_components=10).fit(fit_images)
    assert test.p_value(pixel_like_rows(rng, 500, rotation).reshape(500, 1, 8, 8)) > 1e-3
    shift = np.zeros(64)
    shift[:4] = 0.2  # about 1.2 of a pixel's standard deviation, in 4 of 64 pixels
    assert test.p_value(pixel_like_rows(rng, 500, rotation, shift=shift).reshape(500, 1, 8, 8)) < 1e-6


def test_pixel_hotelling_refuses_wrong_shapes():
    rng = np.random.default_rng(13)
    with pytest.raises(ValueError, match="fit_pixels needs at least 11"):
        PixelPCAHotelling(n_components=10).fit(rng.normal(size=(10, 64)))
    with pytest.raises(ValueError, match="fewer than n_components"):
        PixelPCAHotelling(n_components=10).fit(rng.normal(size=(100, 5)))
    with pytest.raises(ValueError, match="vary in fewer than"):
        PixelPCAHotelling(n_components=10).fit(np.ones((100, 64)))
    test = PixelPCAHotelling(n_components=10).fit(rng.normal(size=(100, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"rows have shape \(64,\), the fit rows' are \(1, 8, 8\)"):
        test.p_value(rng.normal(size=(50, 64)))
    with pytest.raises(RuntimeError, match="call fit"):
        PixelPCAHotelling().p_value(rng.normal(size=(50, 64)))


# --- BBSD -----------------------------------------------------------------------------------------------


def softmax_rows(rng, n, class_shares=None):
    """Confident softmax-like rows: a Dirichlet peaked on each row's class, classes drawn by `class_shares`."""
    shares = np.full(10, 0.1) if class_shares is None else np.asarray(class_shares)
    classes = rng.choice(10, size=n, p=shares)
    concentration = np.full((n, 10), 0.3)
    concentration[np.arange(n), classes] = 5.0
    draws = rng.gamma(concentration)
    return draws / draws.sum(axis=1, keepdims=True)


def test_bbsd_is_bonferroni_over_scipys_asymptotic_two_sample_ks_per_output():
    rng = np.random.default_rng(20)
    reference, night = softmax_rows(rng, 700), softmax_rows(rng, 150)
    night[:20] = reference[:20]  # ties across the samples are counted as ks_2samp counts them
    expected = [scipy.stats.ks_2samp(reference[:, j], night[:, j], method="asymp").pvalue for j in range(10)]
    test = BBSD().fit(reference)
    np.testing.assert_allclose(test.output_p_values(night), expected, rtol=1e-12)
    assert test.p_value(night) == pytest.approx(min(1.0, 10 * min(expected)), rel=1e-12)


def test_bbsd_keeps_its_level_on_null_nights():
    # Bonferroni over dependent outputs is conservative: at most the level, within binomial noise.
    rng = np.random.default_rng(21)
    p_values = [BBSD().fit(softmax_rows(rng, 500)).p_value(softmax_rows(rng, 200)) for _ in range(300)]
    assert rejection_share(p_values) <= LEVEL + binomial_margin(300)


def test_bbsd_catches_a_label_shift():
    rng = np.random.default_rng(22)
    test = BBSD().fit(softmax_rows(rng, 2000))
    shifted = np.full(10, 0.7 / 9)
    shifted[3] = 0.3
    assert test.p_value(softmax_rows(rng, 500, shifted)) < 1e-6
    assert test.output_p_values(softmax_rows(rng, 500, shifted)).argmin() == 3


def test_bbsd_refuses_wrong_shapes():
    rng = np.random.default_rng(23)
    with pytest.raises(ValueError, match="reference_outputs must have 2 dimension"):
        BBSD().fit(rng.random(100))
    test = BBSD().fit(softmax_rows(rng, 100))
    with pytest.raises(ValueError, match="night_outputs has 9 outputs, the reference has 10"):
        test.p_value(softmax_rows(rng, 50)[:, :9])
    with pytest.raises(RuntimeError, match="call fit"):
        BBSD().p_value(softmax_rows(rng, 50))


# --- MMD ------------------------------------------------------------------------------------------------


def test_mmd_keeps_its_level_on_null_nights():
    rng = np.random.default_rng(30)
    p_values = [
        MMDDrift(seed=night).fit(rng.normal(size=(300, 4))).p_value(rng.normal(size=(100, 4))) for night in range(300)
    ]
    assert abs(rejection_share(p_values) - LEVEL) <= binomial_margin(300)


def test_mmd_catches_a_shift_of_the_mean_and_one_of_the_spread_alone():
    rng = np.random.default_rng(31)
    test = MMDDrift(n_permutations=100).fit(rng.normal(size=(500, 4)))
    assert test.p_value(rng.normal(size=(300, 4))) > 0.01
    assert test.p_value(rng.normal(size=(300, 4)) + np.array([0.5, 0, 0, 0])) == pytest.approx(1 / 101)
    assert test.p_value(1.5 * rng.normal(size=(300, 4))) == pytest.approx(1 / 101)


def test_mmd_statistic_approximates_the_gaussian_kernel_mmd_with_the_median_bandwidth():
    rng = np.random.default_rng(32)
    reference, night = rng.normal(size=(400, 3)), rng.normal(size=(200, 3)) + np.array([0.7, 0, 0])
    test = MMDDrift(n_features=8192, bandwidth_rows=400).fit(reference)
    pairs = np.sum((reference[:, None] - reference[None]) ** 2, axis=-1)[np.triu_indices(400, k=1)]
    assert test.bandwidth_ == pytest.approx(np.sqrt(np.median(pairs) / 2))

    def kernel(x, y):
        return np.exp(-np.sum((x[:, None] - y[None]) ** 2, axis=-1) / (2 * test.bandwidth_**2))

    exact = kernel(night, night).mean() + kernel(reference, reference).mean() - 2 * kernel(night, reference).mean()
    assert test.statistics(night)[0] == pytest.approx(exact, rel=0.1)


def test_mmd_permutations_are_drawn_once_per_night_size_and_p_values_are_reproducible():
    rng = np.random.default_rng(33)
    test = MMDDrift(n_permutations=50).fit(rng.normal(size=(200, 4)))
    night = rng.normal(size=(80, 4))
    first = test.p_value(night)
    test.p_value(rng.normal(size=(60, 4)))
    assert sorted(test._weights) == [60, 80]
    assert test.p_value(night) == first


def test_mmd_refuses_wrong_shapes():
    rng = np.random.default_rng(34)
    with pytest.raises(ValueError, match="reference_embedding must have 2 dimension"):
        MMDDrift().fit(rng.normal(size=100))
    with pytest.raises(ValueError, match="identical"):
        MMDDrift().fit(np.ones((100, 4)))
    test = MMDDrift().fit(rng.normal(size=(100, 4)))
    with pytest.raises(ValueError, match="night_embedding has 3 dimensions, the reference has 4"):
        test.p_value(rng.normal(size=(50, 3)))
    with pytest.raises(RuntimeError, match="call fit"):
        MMDDrift().p_value(rng.normal(size=(50, 4)))


# --- the classifier and its labels -----------------------------------------------------------------------


def test_classifier_beats_chance_on_a_few_hundred_rows_after_a_few_steps():
    torch.set_num_threads(1)
    train = load_source("fashion-mnist", "train", limit=500)
    test = load_source("fashion-mnist", "test", limit=300)
    model = train_classifier(train.images, train.labels, steps=40, seed=0)
    softmax, embedding = classifier_outputs(model, test.images, batch_size=128)
    assert softmax.shape == (300, 10) and embedding.shape == (300, 32)
    np.testing.assert_allclose(softmax.sum(axis=1), 1.0, rtol=1e-5)
    assert (softmax.argmax(axis=1) == test.labels).mean() > 0.4  # chance is 0.1


def test_classifier_training_is_seeded():
    torch.set_num_threads(1)
    train = load_source("fashion-mnist", "train", limit=64)
    outputs = [
        classifier_outputs(train_classifier(train.images, train.labels, steps=2, seed=seed), train.images[:8])[0]
        for seed in (3, 3, 4)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_classifier_refuses_wrong_images_and_labels():
    images = np.zeros((10, 1, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, 1, 28, 28\)"):
        train_classifier(images.astype(np.float32), np.zeros(10, np.int64), steps=1, seed=0)
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, 1, 28, 28\)"):
        train_classifier(images[:, 0], np.zeros(10, np.int64), steps=1, seed=0)
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(10,\)"):
        train_classifier(images, np.zeros(9, np.int64), steps=1, seed=0)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        train_classifier(images, np.full(10, 10), steps=1, seed=0)
