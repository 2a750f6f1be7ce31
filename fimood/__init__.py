"""fimood: out-of-distribution scoring with layer-wise gradient norms of deep generative models.

The layers, bottom up (docs/architecture.md): `engine` and `models` (per-sample gradient norms, the
likelihood models), `method` (features, statistics, scoring rules, the detector), `lake` (shards,
image tables, commits), `passes` (the Ray fit and score passes), `apps` and `cli`.
"""

from fimood.engine import layerwise_grad_norms
from fimood.lake.commit import read_committed
from fimood.method.detector import DetectorArtifact, DetectorSettings, GradNormDetector
from fimood.models import LikelihoodModel, load_model, save_model

__all__ = [
    "DetectorArtifact",
    "DetectorSettings",
    "GradNormDetector",
    "LikelihoodModel",
    "layerwise_grad_norms",
    "load_model",
    "read_committed",
    "save_model",
]
__version__ = "0.2.0"
