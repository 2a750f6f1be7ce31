"""The distributed passes over a lake, on Ray Data: the fit pass, the score pass (and the monitor's).

The only package that imports `ray`. `fit` and `score` are the entry points; `PipelineConfig` says
how rows are read and how the actor pool runs.
"""

from fimood.passes.config import PipelineConfig
from fimood.passes.fit_pass import FitSummary, fit
from fimood.passes.runtime import quiet_ray, start_ray
from fimood.passes.score_pass import PartitionResult, ScoreSummary, ScoringFailed, score

__all__ = [
    "FitSummary",
    "PartitionResult",
    "PipelineConfig",
    "ScoreSummary",
    "ScoringFailed",
    "fit",
    "quiet_ray",
    "score",
    "start_ray",
]
