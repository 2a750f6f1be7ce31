"""fimood: out-of-distribution scoring with layer-wise gradient norms of deep generative models."""

from fimood.detector import Detector, DetectorSettings, GradNormDetector
from fimood.engine import layerwise_grad_norms
from fimood.models import LikelihoodModel, load_model, save_model

__all__ = [
    "Detector",
    "DetectorSettings",
    "GradNormDetector",
    "LikelihoodModel",
    "layerwise_grad_norms",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"
