"""The detection study: every rule × model × OOD set × batch size, its report, and the default-rule criterion."""

import json
import re
from dataclasses import replace
from itertools import product

import numpy as np
import pytest

from fimood.engine import trainable_parameters
from fimood.lake.tables import read_image_parquet
from fimood.method.detector import DetectorSettings
from fimood.method.features import compute_features
from fimood.method.reduce import FitReduce
from fimood.method.scoring import DEFAULT_RULE, SCORING_RULES
from fimood.method.splits import calibration_rows
from fimood.research import study
from fimood.research.study import StudyConfig, StudyRow, made_up_sets, run_study
from fimood.research.study_report import PrincipalAxes, chosen_rule, write_report


def test_made_up_ood_sets_are_transformations_of_the_in_distribution_rows():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 1, 6, 6), dtype=np.uint8)
    sets = made_up_sets(["a", "b", "c", "d"], images)
    assert sorted(sets) == ["fashion-inverted", "fashion-vflip", "uniform-noise"]
    np.testing.assert_array_equal(sets["fashion-vflip"][1][:, :, ::-1], images)
    np.testing.assert_array_equal(sets["fashion-inverted"][1], 255 - images)
    assert sets["uniform-noise"][1].shape == images.shape
    all_ids = [i for ids, _ in sets.values() for i in ids]
    assert len(set(all_ids)) == 12 and not set(all_ids) & {"a", "b", "c", "d"}  # own ids, own seeds


def test_the_criterion_picks_the_best_mean_per_row_auroc_and_never_one_pair():
    def row(method: str, ood_set: str, auroc: float, size: int = 1) -> StudyRow:
        return StudyRow("glow", ood_set, size, method, auroc, 0.5, 10, 10)

    rows = [
        row("gradient:paper", "mnist", 0.99),  # wins one pair...
        row("gradient:paper", "digits", 0.50),
        row("gradient:one-sided", "mnist", 0.80),  # ...but this one wins on average
        row("gradient:one-sided", "digits", 0.80),
        row("gradient:full-cov", "mnist", 0.70),
        row("gradient:full-cov", "digits", 0.70),
        row("gradient:full-cov", "mnist", 1.00, size=5),  # batch 5 does not count
    ]
    assert chosen_rule(rows) == "one-sided"


def test_principal_axes_measure_rows_in_in_distribution_standard_deviations_with_the_common_mode_first():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(4000, 1))
    features = -5 + 2 * shared + 0.5 * rng.normal(size=(4000, 8)) + np.arange(8)
    axes = PrincipalAxes.fit(features, n_axes=3)
    coordinates = axes.project(features)
    np.testing.assert_allclose(coordinates.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(coordinates.std(0), 1.0, rtol=1e-3)
    assert axes.shares[0] > 0.9 and (np.diff(axes.shares) <= 0).all()
    all_larger = features.mean(0) + features.std(0)  # every layer one standard deviation up together
    assert abs(axes.project(all_larger[None])[0, 0] - 1.0) < 0.05  # one standard deviation along the common mode


def test_the_study_scores_every_rule_model_ood_set_and_batch_size_and_writes_its_report(tmp_path, monkeypatch):
    _small_sources(monkeypatch)
    config = StudyConfig(
        work=str(tmp_path / "work"), preset="tiny", train_steps=2, rows=30, fit_rows=60, group_sizes=(1, 2)
    )
    result = run_study(config)
    ood_sets = ["digits", "fashion-inverted", "fashion-vflip", "mnist", "uniform-noise"]
    methods = [f"gradient:{rule}" for rule in SCORING_RULES] + ["typicality", "likelihood"]
    expected = set(product(["glow", "vae", "ddpm"], ood_sets, [1, 2], methods))
    assert {(r.model, r.ood_set, r.group_size, r.method) for r in result.rows} == expected
    assert all(0.0 <= r.auroc <= 1.0 and 0.0 <= r.fpr95 <= 1.0 for r in result.rows)
    assert {(r.n_id, r.n_ood) for r in result.rows if r.group_size == 2} == {(15, 15)}
    assert result.models["glow"]["n_fit"] == sum(
        ~calibration_rows([f"fashion-mnist/test/{i:05d}" for i in range(60)], 0.2)
    )

    command = "fimood study --preset tiny"
    rule = write_report(result, config, str(tmp_path / "docs"), command, seconds=60.0)
    report = (tmp_path / "docs" / "detection-study.md").read_text()
    assert f"`{command}`" in report and f"picks **{rule}**" in report and "| vae | uniform-noise |" in report
    document = json.loads((tmp_path / "docs" / "detection-study.json").read_text())
    assert document["chosen_rule"] == rule and len(document["rows"]) == len(expected)
    assert (tmp_path / "docs" / "detection-study-features.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Where the OOD rows sit" in report and "| ddpm | digits | " in report
    assert (tmp_path / "docs" / "detection-study-axes.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"\| vae \| .* \| tiny preset, 2 steps, seed 0, code [\w.+]+; trained .* in [\d.]+ min", report)


def test_the_studys_per_row_detectors_are_the_ones_fimood_fit_builds(tmp_path, monkeypatch):
    """Same rows, same split, same reduce: the study's batch-1 detector scores exactly like `passes.fit`'s."""
    _small_sources(monkeypatch)
    config = StudyConfig(work=str(tmp_path), models=("vae",), preset="tiny", train_steps=2, rows=30, fit_rows=60)
    urls = study.write_study_data(config.work, config.rows, config.fit_rows)
    model, _ = study.checkpoint("vae", urls["fashion-mnist-train"], config)
    fit = read_image_parquet(urls["fashion-mnist-fit"], model.image_shape)
    detectors, _, _ = study.fit_detectors("vae", model, fit, 1, config)
    reduce = FitReduce(len(trainable_parameters(model)), DetectorSettings().calibration_fraction)
    features = compute_features(model, fit.images, fit.ids)
    order = np.random.default_rng(0).permutation(len(fit.ids))  # a pipeline streams rows in any order
    for batch in np.array_split(order, 7):
        reduce.add([fit.ids[i] for i in batch], features.log_sq_norms[batch], features.nll[batch])
    expected, _ = reduce.finish(DetectorSettings().false_positive_rate, DEFAULT_RULE)
    np.testing.assert_allclose(detectors[DEFAULT_RULE].calibration_scores_, expected.calibration_scores_, rtol=1e-10)
    assert detectors[DEFAULT_RULE].threshold_ == pytest.approx(expected.threshold_, rel=1e-10)


def test_data_and_checkpoints_are_reused_only_when_made_the_same_way(tmp_path, monkeypatch):
    _small_sources(monkeypatch)
    config = StudyConfig(work=str(tmp_path), models=("vae",), preset="tiny", train_steps=2, rows=30, fit_rows=60)
    urls = study.write_study_data(config.work, config.rows, config.fit_rows)
    first, first_record = study.checkpoint("vae", urls["fashion-mnist-train"], config)
    again, again_record = study.checkpoint("vae", urls["fashion-mnist-train"], config)
    assert again.checkpoint_sha256 == first.checkpoint_sha256 and again_record == first_record  # reused
    reseeded, reseeded_record = study.checkpoint("vae", urls["fashion-mnist-train"], replace(config, seed=1))
    assert reseeded_record["recipe"]["seed"] == 1 and reseeded.checkpoint_sha256 != first.checkpoint_sha256
    _, longer_record = study.checkpoint("vae", urls["fashion-mnist-train"], replace(config, train_steps=3))
    assert longer_record["recipe"]["steps"] == 3 and longer_record["trained_at"]
    heldout = tmp_path / "data" / "fashion-mnist-heldout"
    assert read_image_parquet(str(heldout)).images.shape[0] == 30
    study.write_study_data(config.work, rows=20, fit_rows=60)
    assert read_image_parquet(str(heldout)).images.shape[0] == 20  # made again for the new row count


def _small_sources(monkeypatch) -> None:
    real_load_source = study.load_source
    monkeypatch.setattr(study, "load_source", lambda name, split="test": real_load_source(name, split, limit=120))
