"""The detector: calibrated threshold and p-values, and a save → load round trip without pickle."""

import json

import numpy as np
import pytest

from fimood.method.baselines import TypicalityTest
from fimood.method.detector import DetectorArtifact, DetectorSettings, GradNormDetector, load_detector
from fimood.method.scoring import SCORING_RULES
from fimood.method.statistics import FeatureStats


def _features(rng, n, shift=0.0):
    return rng.normal(loc=shift, size=(n, 6)) + np.arange(6)


def _detector(rng) -> DetectorArtifact:
    by_group = {size: GradNormDetector().fit(_features(rng, 300), _features(rng, 100)) for size in (1, 5)}
    return DetectorArtifact(
        model_uri="memory://model",
        model_sha256="ab" * 32,
        feature_names=[f"p{i}" for i in range(6)],
        settings=DetectorSettings(),
        by_group=by_group,
        typicality=TypicalityTest().fit(rng.normal(size=300)),
    )


@pytest.mark.parametrize("rule", sorted(SCORING_RULES))
def test_threshold_flags_the_chosen_share_of_in_distribution_rows(rule):
    rng = np.random.default_rng(0)
    detector = GradNormDetector(rule=rule, false_positive_rate=0.1).fit(_features(rng, 2000), _features(rng, 2000))
    flagged = detector.predict(_features(rng, 5000)).mean()
    assert flagged == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("rule", sorted(SCORING_RULES))
def test_p_values_are_calibrated_and_ordered_by_score(rule):
    rng = np.random.default_rng(1)
    detector = GradNormDetector(rule=rule).fit(_features(rng, 500), _features(rng, 1999))
    features = _features(rng, 4000)
    scores, p = detector.ood_score(features), detector.p_values(features)
    assert (p > 0).all() and (p <= 1).all()
    assert np.mean(p <= 0.05) == pytest.approx(0.05, abs=0.015)
    order = np.argsort(scores)
    assert (np.diff(p[order]) <= 0).all()


def test_the_detector_is_a_scikit_learn_estimator():
    """Parameters stored by __init__, checked by fit; clone, check_is_fitted and the outlier-detector methods work."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError as SklearnNotFitted
    from sklearn.utils.validation import check_is_fitted

    from fimood.method.detector import NotFittedError

    rng = np.random.default_rng(11)
    unfitted = GradNormDetector(rule="paper", false_positive_rate=0.1)
    assert unfitted.get_params() == {"rule": "paper", "false_positive_rate": 0.1}
    with pytest.raises(SklearnNotFitted):
        check_is_fitted(unfitted)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        unfitted.ood_score(_features(rng, 3))
    fitted = clone(unfitted).fit(_features(rng, 500), _features(rng, 200))
    check_is_fitted(fitted)
    new = _features(rng, 50, shift=1.0)
    np.testing.assert_array_equal(fitted.score_samples(new), -fitted.ood_score(new))
    np.testing.assert_array_equal(fitted.predict(new), fitted.decision_function(new) < 0)
    np.testing.assert_array_equal(fitted.p_values(new), fitted.p_values_of_scores(fitted.ood_score(new)))
    rows = fitted.score_rows(new, z_scores=True)
    np.testing.assert_array_equal(rows.is_ood, fitted.predict(new))
    assert rows.z_scores.shape == (50, fitted.n_features_kept_) and fitted.n_features_in_ == 6
    assert fitted.set_params(false_positive_rate=0.2).false_positive_rate == 0.2
    with pytest.raises(ValueError, match="no parameters"):
        fitted.set_params(threshold=3.0)


def test_bad_parameters_are_refused_by_fit_not_by_init():
    detector = GradNormDetector(rule="nearest-neighbour")  # stored, as scikit-learn does
    with pytest.raises(ValueError, match="rule must be one of"):
        detector.fit(np.random.default_rng(0).normal(size=(20, 2)))
    with pytest.raises(ValueError, match=r"false_positive_rate must be in \(0, 1\)"):
        GradNormDetector(false_positive_rate=1.5).fit(np.random.default_rng(0).normal(size=(20, 2)))


def test_ood_rows_score_higher_than_in_distribution_rows():
    rng = np.random.default_rng(2)
    detector = GradNormDetector().fit(_features(rng, 500))
    assert detector.ood_score(_features(rng, 200, shift=3.0)).mean() > detector.ood_score(_features(rng, 200)).mean()


def test_fit_from_merged_shard_statistics_equals_one_fit():
    rng = np.random.default_rng(3)
    fit, calibration = _features(rng, 600), _features(rng, 100)
    shards = np.array_split(fit, 4)
    merged = FeatureStats.from_array(shards[0])
    for shard in shards[1:]:
        merged = merged.merge(FeatureStats.from_array(shard))
    one = GradNormDetector().fit(fit, calibration)
    many = GradNormDetector().fit_stats(merged, calibration)
    new = _features(rng, 50)
    np.testing.assert_allclose(many.ood_score(new), one.ood_score(new), rtol=1e-10)
    assert many.threshold_ == pytest.approx(one.threshold_, rel=1e-10)


@pytest.mark.parametrize("root", ["memory://detectors/a", "local"])
def test_save_load_round_trip_gives_identical_scores(root, tmp_path):
    url = str(tmp_path / "det") if root == "local" else root
    rng = np.random.default_rng(4)
    detector = _detector(rng)
    detector_id = detector.save(url)
    loaded = DetectorArtifact.load(url)
    new = _features(rng, 20)
    for size in (1, 5):
        np.testing.assert_array_equal(loaded.by_group[size].ood_score(new), detector.by_group[size].ood_score(new))
        np.testing.assert_array_equal(
            loaded.by_group[size].p_values_of_scores(new[:, 0]), detector.by_group[size].p_values_of_scores(new[:, 0])
        )
        assert loaded.by_group[size].threshold_ == detector.by_group[size].threshold_
    assert loaded.typicality.entropy_ == detector.typicality.entropy_
    assert loaded.detector_id == detector_id == detector.detector_id


def test_artifact_is_json_and_safetensors_only(tmp_path):
    _detector(np.random.default_rng(5)).save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["settings"]["engine"] == "auto"
    assert manifest["model"] == {"uri": "memory://model", "sha256": "ab" * 32}
    # the default rule (combined) learns from half the 100 calibration rows; the other half set the threshold
    assert manifest["groups"]["1"]["n_fit"] == 300 and manifest["groups"]["1"]["n_calibration"] == 50
    assert sorted(manifest["groups"]) == ["1", "5"]


def test_a_format_2_detector_still_loads_and_scores_the_same(tmp_path):
    """Format 2 called the gradient-engine setting `method`; nothing else changed."""
    detector = _detector(np.random.default_rng(6))
    detector.save(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 2
    manifest["settings"]["method"] = manifest["settings"].pop("engine")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = DetectorArtifact.load(str(tmp_path))
    new = _features(np.random.default_rng(7), 5)
    assert loaded.settings == detector.settings and loaded.feature_settings == detector.feature_settings
    np.testing.assert_array_equal(loaded.by_group[1].ood_score(new), detector.by_group[1].ood_score(new))


def test_a_truncated_manifest_or_one_from_the_future_is_refused_by_name(tmp_path):
    _detector(np.random.default_rng(8)).save(str(tmp_path))
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON \(half-written, .*fit the detector again"):
        DetectorArtifact.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text(manifest.replace('"format_version": 3', '"format_version": 99'))
    with pytest.raises(ValueError, match="format_version must be 3, got 99"):
        DetectorArtifact.load(str(tmp_path))


def test_a_detector_whose_features_are_not_the_models_tensors_is_refused(tmp_path, glow64):
    from fimood.models import save_model

    sha = save_model(glow64, str(tmp_path / "model"))
    detector = _detector(np.random.default_rng(9))
    detector.model_uri, detector.model_sha256 = str(tmp_path / "model"), sha
    detector.save(str(tmp_path / "detector"))
    with pytest.raises(ValueError, match="the detector's features are not the model's trainable tensors"):
        load_detector(str(tmp_path / "detector"))


def test_a_model_changed_since_the_fit_is_refused_on_the_driver_and_by_every_replica(tmp_path, glow64):
    from conftest import tiny_glow

    from fimood.models import Glow, save_model
    from fimood.passes.actors import FeatureActor

    sha = save_model(glow64, str(tmp_path / "model"))
    save_model(tiny_glow(seed=1), str(tmp_path / "model"))  # replaced after the fit
    detector = _detector(np.random.default_rng(10))
    detector.model_uri, detector.model_sha256 = str(tmp_path / "model"), sha
    detector.save(str(tmp_path / "detector"))
    with pytest.raises(ValueError, match="changed since the detector was fitted"):
        load_detector(str(tmp_path / "detector"))
    with pytest.raises(ValueError, match="changed while the job ran"):  # what each actor checks as it loads
        FeatureActor(Glow, str(tmp_path / "model"), sha, None, "auto", 1)
