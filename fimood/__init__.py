"""fimood: out-of-distribution scoring with layer-wise gradient norms of deep generative models.

The public API, from images to scores (docs/architecture.md draws the layers behind it):

    model = fimood.load_model(url)                                       # or fimood.train_checkpoint(...)
    features = fimood.compute_features(model, images, ids)               # (n, L) log ‖∇θℓ NLL‖², and NLL
    detector = fimood.GradNormDetector().fit(fit_features, held_out_features)  # scikit-learn-like
    artifact, summary = fimood.fit(model_url, data_url, fimood.PipelineConfig())   # the Ray fit pass
    fimood.score(detector_url, data_url, out_url, fimood.PipelineConfig())        # the Ray score pass
    artifact, model = fimood.load_detector(detector_url); artifact.score_images(model, images, ids)  # in process
    fimood.read_scores(out_url)            # the score table (`table_schema`); any Delta reader reads it too

The Ray passes, the monitor, evaluation and the bundled data load on first use, so `import fimood`
does not import Ray.
"""

import importlib

from fimood.engine import layerwise_grad_norms
from fimood.lake.schema import score_schema, table_schema
from fimood.lake.score_table import read_scores
from fimood.lake.tables import read_image_parquet, write_image_parquet
from fimood.method.baselines import TypicalityTest
from fimood.method.detector import (
    DetectorArtifact,
    DetectorSettings,
    GradNormDetector,
    NotFittedError,
    RowScores,
    load_detector,
)
from fimood.method.features import Features, FeatureSettings, compute_features, seeds_from_ids
from fimood.method.metrics import auroc, detection_metrics
from fimood.method.shift import LifetimeBudget, NightlyBudget
from fimood.method.splits import calibration_rows
from fimood.models import LikelihoodModel, load_model, save_model
from fimood.models.training import TrainConfig
from fimood.version import __version__ as __version__

# Loaded on first use: the passes and the monitor import Ray, and the product's modules (a Ray worker
# unpickling an actor imports this package first) must not load onboarding or evaluation.
_LAZY = {
    "FitSummary": "fimood.passes",
    "PipelineConfig": "fimood.passes",
    "ScoreSummary": "fimood.passes",
    "ScoringFailed": "fimood.passes",
    "fit": "fimood.passes",
    "quiet_ray": "fimood.passes",
    "score": "fimood.passes",
    "MonitorConfig": "fimood.monitor",
    "MonitorResult": "fimood.monitor",
    "run_monitor": "fimood.monitor",
    "evaluate": "fimood.evaluation",
    "load_source": "fimood.onboarding.datasets",
    "train_checkpoint": "fimood.onboarding.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fimood' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DetectorArtifact",
    "DetectorSettings",
    "FeatureSettings",
    "Features",
    "FitSummary",
    "GradNormDetector",
    "LifetimeBudget",
    "LikelihoodModel",
    "MonitorConfig",
    "MonitorResult",
    "NightlyBudget",
    "NotFittedError",
    "PipelineConfig",
    "RowScores",
    "ScoreSummary",
    "ScoringFailed",
    "TrainConfig",
    "TypicalityTest",
    "auroc",
    "calibration_rows",
    "compute_features",
    "detection_metrics",
    "evaluate",
    "fit",
    "layerwise_grad_norms",
    "load_detector",
    "load_model",
    "load_source",
    "quiet_ray",
    "read_image_parquet",
    "read_scores",
    "run_monitor",
    "save_model",
    "score",
    "score_schema",
    "seeds_from_ids",
    "table_schema",
    "train_checkpoint",
    "write_image_parquet",
]
