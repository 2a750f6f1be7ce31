"""The OOD detector: a scoring rule plus calibration, and the artifact a fit saves.

`GradNormDetector` is a scikit-learn-like estimator over (n, L) log-norm features for one group
size. `DetectorArtifact` is what `fimood fit` writes and `fimood score` reads: one estimator per
group size, the model it was fitted on (URI and content hash), the Typicality baseline and the
settings, saved as a folder of `manifest.json` + `arrays.safetensors` (never pickle).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from fimood.engine import METHODS
from fimood.method.baselines import TypicalityTest
from fimood.method.scoring import DEFAULT_RULE, check_rule, conformal_p_values, make_rule
from fimood.method.statistics import FeatureStats
from fimood.models import LikelihoodModel, load_model
from fimood.storage import StorageOptions, join, parse_json, parse_safetensors, read_bytes, sha256_hex, write_bytes

FORMAT_VERSION = 3  # 2: full co-moment matrix and a scoring rule; 3: the gradient engine's setting named `engine`
MANIFEST_NAME = "manifest.json"
ARRAYS_NAME = "arrays.safetensors"


class GradNormDetector:
    """A scoring rule over log gradient norms (`fimood.method.scoring`), with a calibrated threshold.

    Args:
        rule: name of the scoring rule (see `fimood.method.scoring.SCORING_RULES`).
        false_positive_rate: share of in-distribution rows flagged at the threshold.

    Attributes (after fit): stats_, rule_ (the fitted rule), calibration_scores_ (sorted OOD scores
    of the calibration rows), threshold_.
    """

    def __init__(self, *, rule: str = DEFAULT_RULE, false_positive_rate: float = 0.05):
        check_rule(rule)
        if not 0.0 < false_positive_rate < 1.0:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate!r}")
        self.rule = rule
        self.false_positive_rate = false_positive_rate

    def fit(self, features: np.ndarray, calibration: np.ndarray | None = None) -> GradNormDetector:
        """Fit on (n, L) features; calibrate on `calibration` (held-out rows), else in-sample."""
        return self.fit_stats(FeatureStats.from_array(features), features if calibration is None else calibration)

    def fit_stats(self, stats: FeatureStats, calibration: np.ndarray) -> GradNormDetector:
        """Fit from merged statistics (the distributed path), then calibrate on (m, L) features.

        A rule that learns from calibration rows (the `combined` ones) gets the even rows in the order given; the
        odd rows set the threshold. The pipeline passes its calibration sample in id-hash order.
        """
        rule = make_rule(self.rule).fit_stats(stats)
        if rule.learns_from_calibration:  # the rows that set the threshold stay apart from those the rule learns from
            rule.calibrate(calibration[0::2])
            calibration = calibration[1::2]
        if len(calibration) == 0:
            raise ValueError(f"calibration needs at least {2 if rule.learns_from_calibration else 1} rows")
        self.stats_, self.rule_ = stats, rule
        self.calibration_scores_ = np.sort(self.rule_.ood_score(calibration))
        self.threshold_ = float(np.quantile(self.calibration_scores_, 1.0 - self.false_positive_rate, method="higher"))
        return self

    def score_samples(self, features: np.ndarray) -> np.ndarray:
        """The negated OOD score (for the paper's rule, the log density); higher = more typical. Shape (n,)."""
        return -self.ood_score(features)

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        """The rule's score of (n, L) features; higher = more OOD. Shape (n,)."""
        self._check_fitted()
        return self.rule_.ood_score(features)

    def p_value(self, ood_scores: np.ndarray) -> np.ndarray:
        """(1 + #calibration rows scoring at least as high) / (1 + #calibration rows): a conformal p-value."""
        self._check_fitted()
        return conformal_p_values(self.calibration_scores_, ood_scores)

    def predict(self, ood_scores: np.ndarray) -> np.ndarray:
        """True where a row is OOD at the calibrated threshold. Shape (n,)."""
        self._check_fitted()
        return np.asarray(ood_scores) > self.threshold_

    def _check_fitted(self) -> None:
        if not hasattr(self, "rule_"):
            raise RuntimeError("this GradNormDetector is not fitted yet; call fit or fit_stats first")


@dataclass(frozen=True)
class DetectorSettings:
    """How features were computed and the detector fitted; stored in the manifest."""

    engine: str = "auto"  # the gradient engine (`fimood.engine.METHODS`)
    rule: str = DEFAULT_RULE
    batch_size: int = 64
    false_positive_rate: float = 0.05
    calibration_fraction: float = 0.2

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if self.engine not in METHODS:
            raise ValueError(f"engine must be one of {METHODS}, got {self.engine!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


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
        settings = DetectorSettings(**manifest["settings"])
        by_group = {}
        for size in sorted(int(key) for key in manifest["groups"]):
            key = f"group{size}"
            stats = FeatureStats(
                count=manifest["groups"][str(size)]["n_fit"],
                mean=arrays[f"{key}.mean"],
                comoment=arrays[f"{key}.comoment"],
                n_at_floor=arrays[f"{key}.n_at_floor"],
            )
            detector = GradNormDetector(rule=settings.rule, false_positive_rate=settings.false_positive_rate)
            detector.stats_ = stats
            prefix = f"{key}.rule."
            rule_state = {name[len(prefix) :]: array for name, array in arrays.items() if name.startswith(prefix)}
            detector.rule_ = make_rule(settings.rule).fit_stats(stats).load_calibration_state(rule_state)
            detector.calibration_scores_ = arrays[f"{key}.calibration_scores"]
            detector.threshold_ = manifest["groups"][str(size)]["threshold"]
            by_group[size] = detector
        typicality = TypicalityTest.from_entropy(manifest["typicality_entropy"])
        return cls(
            model_uri=manifest["model"]["uri"],
            model_sha256=manifest["model"]["sha256"],
            feature_names=manifest["feature_names"],
            settings=settings,
            by_group=by_group,
            typicality=typicality,
            extra=manifest.get("extra", {}),
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
                "n_features_kept": int(detector.rule_.kept_features_.sum()),
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
            "settings": asdict(self.settings),
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


def load_detector_and_model(
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
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if names != detector.feature_names:
        unknown = sorted(set(detector.feature_names) ^ set(names))[:3] or "their order"
        raise ValueError(
            f"{detector_url}: the detector's features are not the model's trainable tensors (they differ in "
            f"{unknown}); fit the detector again on this model"
        )
    return detector, model
