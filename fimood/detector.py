"""The OOD detector: a scoring rule plus calibration, and its saved artifact.

`GradNormDetector` is a scikit-learn-like estimator over (n, L) log-norm features for one group
size. `Detector` bundles one per group size with the model reference, the Typicality baseline and
the settings, and saves as a directory: `manifest.json` + `arrays.safetensors` (never pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from fimood.baselines import TypicalityTest
from fimood.density import FeatureStats
from fimood.scoring import DEFAULT_RULE, check_rule, conformal_p_values, make_rule
from fimood.storage import StorageOptions, join, read_bytes, sha256_hex, write_bytes

FORMAT_VERSION = 2  # 2: full co-moment matrix and a scoring rule
MANIFEST_NAME = "manifest.json"
ARRAYS_NAME = "arrays.safetensors"


class GradNormDetector:
    """A scoring rule over log gradient norms (`fimood.scoring`), with a calibrated threshold.

    Args:
        rule: name of the scoring rule (see `fimood.scoring.SCORING_RULES`).
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

    method: str = "auto"
    rule: str = DEFAULT_RULE
    batch_size: int = 64
    false_positive_rate: float = 0.05
    calibration_fraction: float = 0.2

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class Detector:
    """Everything needed to score new rows: model reference, features, per-group detectors, baselines."""

    model_uri: str
    model_sha256: str
    feature_names: list[str]
    settings: DetectorSettings
    by_group: dict[int, GradNormDetector]
    typicality: TypicalityTest
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def detector_id(self) -> str:
        """Content hash of the manifest and arrays: same fit, same id."""
        manifest, arrays = self._serialize()
        return sha256_hex(manifest, arrays)[:16]

    def save(self, url: str, storage_options: StorageOptions = None) -> str:
        """Write manifest.json and arrays.safetensors under `url`; returns the detector id."""
        manifest, arrays = self._serialize()
        write_bytes(join(url, ARRAYS_NAME), arrays, storage_options)
        write_bytes(join(url, MANIFEST_NAME), manifest, storage_options)
        return sha256_hex(manifest, arrays)[:16]

    @classmethod
    def load(cls, url: str, storage_options: StorageOptions = None) -> Detector:
        manifest = json.loads(read_bytes(join(url, MANIFEST_NAME), storage_options))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{url}: format_version must be {FORMAT_VERSION}, got {manifest.get('format_version')!r}")
        arrays = safetensors.numpy.load(read_bytes(join(url, ARRAYS_NAME), storage_options))
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
