"""The OOD detector: a scoring rule plus calibration, and the artifact a fit saves.

`GradNormDetector` is a scikit-learn-like estimator over (n, L) log-norm features for one group
size. `DetectorArtifact` is what `fimood fit` writes and `fimood score` reads: one estimator per
group size, the model it was fitted on (URI and content hash), the Typicality baseline and the
settings, saved as a folder of `manifest.json` + `arrays.safetensors` (never pickle).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from fimood.engine import trainable_parameters
from fimood.method.baselines import TypicalityTest
from fimood.method.features import FeatureSettings, compute_features
from fimood.method.scoring import DEFAULT_RULE, ScoringRule, check_rule, conformal_p_values, make_rule
from fimood.method.statistics import FeatureStats
from fimood.models import LikelihoodModel, load_model
from fimood.storage import StorageOptions, join, parse_json, parse_safetensors, read_bytes, sha256_hex, write_bytes

FORMAT_VERSION = 3  # 2: full co-moment matrix and a scoring rule; 3: the gradient engine's setting named `engine`
MANIFEST_NAME = "manifest.json"
ARRAYS_NAME = "arrays.safetensors"


class NotFittedError(ValueError, AttributeError):
    """Scoring before `fit`: both a ValueError and an AttributeError, as scikit-learn's is."""


@dataclass(frozen=True)
class RowScores:
    """A detector's verdict on rows: each of shape (n,); `z_scores` (n, n_features_kept_) when asked for."""

    ood_score: np.ndarray  # higher = more OOD
    p_value: np.ndarray  # conformal, against the calibration rows
    is_ood: np.ndarray  # above the calibrated threshold
    z_scores: np.ndarray | None = None


class GradNormDetector:
    """A scoring rule over log gradient norms (`fimood.method.scoring`), with a calibrated threshold.

    A scikit-learn estimator: parameters are stored by `__init__` and checked by `fit`; `get_params` and
    `set_params` make `sklearn.base.clone` work; every scoring method takes (n, L) features.

    Args:
        rule: name of the scoring rule (see `fimood.method.scoring.SCORING_RULES`).
        false_positive_rate: share of in-distribution rows flagged at the threshold.

    Attributes (after fit): stats_ (the fit rows' statistics), rule_ (the fitted rule), calibration_scores_
    (sorted OOD scores of the calibration rows), threshold_, n_features_in_, n_features_kept_.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> detector = GradNormDetector(rule="paper").fit(rng.normal(size=(200, 3)), rng.normal(size=(50, 3)))
        >>> detector.predict(np.zeros((2, 3))).tolist()
        [False, False]
    """

    def __init__(self, *, rule: str = DEFAULT_RULE, false_positive_rate: float = 0.05):
        self.rule = rule
        self.false_positive_rate = false_positive_rate

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"rule": self.rule, "false_positive_rate": self.false_positive_rate}

    def set_params(self, **params: Any) -> GradNormDetector:
        unknown = sorted(set(params) - set(self.get_params()))
        if unknown:
            raise ValueError(f"GradNormDetector has no parameters {unknown}; it has {sorted(self.get_params())}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"GradNormDetector(rule={self.rule!r}, false_positive_rate={self.false_positive_rate!r})"

    def fit(self, features: np.ndarray, calibration: np.ndarray | None = None) -> GradNormDetector:
        """Fit on (n, L) features; calibrate on `calibration` (held-out rows), else in-sample."""
        return self.fit_stats(FeatureStats.from_array(features), features if calibration is None else calibration)

    def fit_stats(self, stats: FeatureStats, calibration: np.ndarray) -> GradNormDetector:
        """Fit from merged statistics (the distributed path), then calibrate on (m, L) features.

        A rule that learns from calibration rows (the `combined` ones) gets the even rows in the order given; the
        odd rows set the threshold. The pipeline passes its calibration sample in id-hash order.
        """
        check_rule(self.rule)
        if not 0.0 < self.false_positive_rate < 1.0:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {self.false_positive_rate!r}")
        rule = make_rule(self.rule).fit_stats(stats)
        if rule.learns_from_calibration:  # the rows that set the threshold stay apart from those the rule learns from
            rule.calibrate(calibration[0::2])
            calibration = calibration[1::2]
        if len(calibration) == 0:
            raise ValueError(f"calibration needs at least {2 if rule.learns_from_calibration else 1} rows")
        calibration_scores = np.sort(rule.ood_score(calibration))
        threshold = float(np.quantile(calibration_scores, 1.0 - self.false_positive_rate, method="higher"))
        return self._set_fitted(stats, rule, calibration_scores, threshold)

    def _set_fitted(
        self, stats: FeatureStats, rule: ScoringRule, calibration_scores: np.ndarray, threshold: float
    ) -> GradNormDetector:
        self.stats_, self.rule_ = stats, rule
        self.calibration_scores_, self.threshold_ = calibration_scores, threshold
        self.n_features_in_ = rule.n_features_in_
        self.n_features_kept_ = int(rule.kept_features_.sum())
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "rule_")

    def __sklearn_tags__(self):  # what scikit-learn's own helpers ask (imported only then: it is not a dependency)
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False))  # predict is boolean, not ±1

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        """The rule's score of (n, L) features; higher = more OOD. Shape (n,)."""
        self._check_fitted()
        return self.rule_.ood_score(features)

    def score_samples(self, features: np.ndarray) -> np.ndarray:
        """The negated OOD score (for the paper's rule, the log density); higher = more typical. Shape (n,)."""
        return -self.ood_score(features)

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """threshold − OOD score: negative where a row is OOD (scikit-learn's outlier convention). Shape (n,)."""
        ood_score = self.ood_score(features)
        return self.threshold_ - ood_score

    def predict(self, features: np.ndarray) -> np.ndarray:
        """True where a row is OOD at the calibrated threshold. Shape (n,)."""
        return self.is_ood_score(self.ood_score(features))

    def p_values(self, features: np.ndarray) -> np.ndarray:
        """Conformal p-values of (n, L) features' rows against the calibration rows. Shape (n,)."""
        return self.p_values_of_scores(self.ood_score(features))

    def p_values_of_scores(self, ood_scores: np.ndarray) -> np.ndarray:
        """(1 + #calibration rows scoring at least as high) / (1 + #calibration rows), for OOD scores (n,)."""
        self._check_fitted()
        return conformal_p_values(self.calibration_scores_, ood_scores)

    def is_ood_score(self, ood_scores: np.ndarray) -> np.ndarray:
        """True where an OOD score (n,) is above the calibrated threshold."""
        self._check_fitted()
        return np.asarray(ood_scores) > self.threshold_

    def z_scores(self, features: np.ndarray) -> np.ndarray:
        """(f − μ)/σ of each kept feature, shape (n, n_features_kept_): where a row's layers stand."""
        self._check_fitted()
        return self.rule_.z_scores(features)

    def score_rows(self, features: np.ndarray, z_scores: bool = False) -> RowScores:
        """Every per-row output at once, from (n, L) features (the score table's columns)."""
        ood_score = self.ood_score(features)
        return RowScores(
            ood_score,
            self.p_values_of_scores(ood_score),
            self.is_ood_score(ood_score),
            self.z_scores(features) if z_scores else None,
        )

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("this GradNormDetector is not fitted yet; call fit or fit_stats first")


@dataclass(frozen=True)
class DetectorSettings:
    """How the detector is fitted; stored in the manifest (with the `FeatureSettings` its features had)."""

    rule: str = DEFAULT_RULE
    false_positive_rate: float = 0.05
    calibration_fraction: float = 0.2

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if not 0.0 < self.false_positive_rate < 1.0:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {self.false_positive_rate!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction!r}")

    def detector(self) -> GradNormDetector:
        """An unfitted estimator with these settings."""
        return GradNormDetector(rule=self.rule, false_positive_rate=self.false_positive_rate)


@dataclass
class DetectorArtifact:
    """Everything needed to score new rows: model reference, features, per-group detectors, baselines."""

    model_uri: str
    model_sha256: str
    feature_names: list[str]
    settings: DetectorSettings
    by_group: dict[int, GradNormDetector]
    typicality: TypicalityTest
    extra: dict[str, Any] = field(default_factory=dict)
    feature_settings: FeatureSettings = field(default_factory=FeatureSettings)  # how its features were computed

    @property
    def per_row(self) -> GradNormDetector:
        """The per-row estimator: what the score pass and the monitor use."""
        return self.by_group[1]

    def score_images(
        self, model: LikelihoodModel, images: np.ndarray, ids: Sequence[str], z_scores: bool = False
    ) -> RowScores:
        """Score uint8 images (n, C, H, W) with their ids in process, as the score pass would: features
        computed with the fit's `feature_settings`, then the per-row detector. `model` is the detector's
        (`load_detector` gives both). Every image must be scorable: an error here raises, where the score
        pass turns it into that row's error."""
        features = compute_features(
            model, images, ids, engine=self.feature_settings.engine, batch_size=self.feature_settings.batch_size
        )
        return self.per_row.score_rows(features.log_sq_norms, z_scores)

    def describe(self) -> str:
        """`4010 fit rows, 990 calibration rows, 228/228 features kept, threshold 12.34` (per row)."""
        per_row = self.per_row
        return (
            f"{per_row.stats_.count} fit rows, {len(per_row.calibration_scores_)} calibration rows, "
            f"{per_row.n_features_kept_}/{len(self.feature_names)} features kept, threshold {per_row.threshold_:.2f}"
        )

    @functools.cached_property
    def detector_id(self) -> str:
        """Content hash of the manifest and arrays: same fit, same id (computed once per detector)."""
        manifest, arrays = self._serialize()
        return sha256_hex(manifest, arrays)[:16]

    def save(self, url: str, storage_options: StorageOptions = None) -> str:
        """Write manifest.json and arrays.safetensors under `url`; returns the detector id."""
        manifest, arrays = self._serialize()
        write_bytes(join(url, ARRAYS_NAME), arrays, storage_options)
        write_bytes(join(url, MANIFEST_NAME), manifest, storage_options)
        return sha256_hex(manifest, arrays)[:16]

    @classmethod
    def load(cls, url: str, storage_options: StorageOptions = None) -> DetectorArtifact:
        fix = "fit the detector again"
        manifest_url, arrays_url = join(url, MANIFEST_NAME), join(url, ARRAYS_NAME)
        manifest = parse_json(read_bytes(manifest_url, storage_options), manifest_url, fix=fix)
        if manifest.get("format_version") not in (2, FORMAT_VERSION):
            raise ValueError(f"{url}: format_version must be {FORMAT_VERSION}, got {manifest.get('format_version')!r}")
        arrays = parse_safetensors(read_bytes(arrays_url, storage_options), safetensors.numpy.load, arrays_url, fix=fix)
        if manifest["format_version"] == 2:  # the same detector; its engine setting was called `method`
            manifest["settings"]["engine"] = manifest["settings"].pop("method")
        recorded = manifest["settings"]
        feature_settings = FeatureSettings(**{name: recorded.pop(name) for name in ("engine", "batch_size")})
        settings = DetectorSettings(**recorded)
        by_group = {}
        for size in sorted(int(key) for key in manifest["groups"]):
            key = f"group{size}"
            stats = FeatureStats(
                count=manifest["groups"][str(size)]["n_fit"],
                mean=arrays[f"{key}.mean"],
                comoment=arrays[f"{key}.comoment"],
                n_at_floor=arrays[f"{key}.n_at_floor"],
            )
            prefix = f"{key}.rule."
            rule_state = {name[len(prefix) :]: array for name, array in arrays.items() if name.startswith(prefix)}
            by_group[size] = settings.detector()._set_fitted(
                stats,
                make_rule(settings.rule).fit_stats(stats).load_calibration_state(rule_state),
                arrays[f"{key}.calibration_scores"],
                manifest["groups"][str(size)]["threshold"],
            )
        typicality = TypicalityTest.from_entropy(manifest["typicality_entropy"])
        return cls(
            model_uri=manifest["model"]["uri"],
            model_sha256=manifest["model"]["sha256"],
            feature_names=manifest["feature_names"],
            settings=settings,
            by_group=by_group,
            typicality=typicality,
            extra=manifest.get("extra", {}),
            feature_settings=feature_settings,
        )

    def _serialize(self) -> tuple[bytes, bytes]:
        groups, arrays = {}, {}
        for size, detector in sorted(self.by_group.items()):
            key = f"group{size}"
            arrays[f"{key}.mean"] = detector.stats_.mean
            arrays[f"{key}.comoment"] = detector.stats_.comoment
            arrays[f"{key}.n_at_floor"] = detector.stats_.n_at_floor
            arrays[f"{key}.calibration_scores"] = detector.calibration_scores_
            arrays.update({f"{key}.rule.{name}": array for name, array in detector.rule_.calibration_state().items()})
            groups[str(size)] = {
                "n_fit": detector.stats_.count,
                "n_calibration": len(detector.calibration_scores_),
                "n_features_kept": detector.n_features_kept_,
                "dropped_features": [
                    name
                    for name, kept in zip(self.feature_names, detector.rule_.kept_features_, strict=True)
                    if not kept
                ],
                "threshold": detector.threshold_,
            }
        manifest = {
            "format": "fimood-detector",
            "format_version": FORMAT_VERSION,
            "model": {"uri": self.model_uri, "sha256": self.model_sha256},
            "feature_names": self.feature_names,
            "settings": asdict(self.feature_settings) | asdict(self.settings),  # one object, as before
            "groups": groups,
            "typicality_entropy": self.typicality.entropy_,
            "extra": self.extra,
        }
        arrays_bytes = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        return json.dumps(manifest, indent=2, sort_keys=True).encode(), arrays_bytes


def training_rows_in_fit(detector: DetectorArtifact) -> int | None:
    """How many of the rows the detector was fitted on its model was trained on (0: none); None when unknown
    (the model records no training data, or the fit predates the check)."""
    count = detector.extra.get("training_rows_in_fit")
    return None if count is None else int(count)


def load_detector(
    detector_url: str, storage_options: StorageOptions = None, allowed_imports: tuple[str, ...] = ()
) -> tuple[DetectorArtifact, LikelihoodModel]:
    """Load a detector and its model, refusing a model whose content changed since the fit."""
    detector = DetectorArtifact.load(detector_url, storage_options)
    model = load_model(detector.model_uri, storage_options, allowed_imports=allowed_imports)
    if model.checkpoint_sha256 != detector.model_sha256:
        raise ValueError(
            f"the model at {detector.model_uri} changed since the detector was fitted "
            f"(sha256 {model.checkpoint_sha256[:12]}, expected {detector.model_sha256[:12]}); fit the detector again"
        )
    names = [name for name, _ in trainable_parameters(model)]
    if names != detector.feature_names:
        unknown = sorted(set(detector.feature_names) ^ set(names))[:3] or "their order"
        raise ValueError(
            f"{detector_url}: the detector's features are not the model's trainable tensors (they differ in "
            f"{unknown}); fit the detector again on this model"
        )
    return detector, model
