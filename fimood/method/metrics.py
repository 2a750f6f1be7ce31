"""Detection metrics; OOD is the positive class and scores are higher for more OOD rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Probability that an OOD row scores above an in-distribution one (ties count half)."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    ranks = rankdata(np.concatenate([id_scores, ood_scores]))
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2) / (n_id * n_ood))


def average_precision(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the precision-recall curve, as the step-wise sum over thresholds (sklearn's definition)."""
    scores = np.concatenate([positive_scores, negative_scores])
    labels = np.concatenate([np.ones(len(positive_scores)), np.zeros(len(negative_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(labels)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / len(positive_scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of in-distribution rows flagged at the threshold that flags `tpr` of OOD rows."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    # The highest threshold that flags at least `tpr` of OOD rows: the k-th largest OOD score.
    k = int(np.ceil(tpr * len(ood_scores) - 1e-9))
    threshold = np.sort(ood_scores)[::-1][max(k, 1) - 1]
    return float(np.mean(id_scores >= threshold))


@dataclass(frozen=True)
class DetectionMetrics:
    auroc: float
    aupr_in: float
    aupr_out: float
    fpr95: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def detection_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> DetectionMetrics:
    """AUROC, AUPR with in-distribution as positive, AUPR with OOD as positive, FPR at 95% TPR."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    return DetectionMetrics(
        auroc=auroc(id_scores, ood_scores),
        aupr_in=average_precision(-id_scores, -ood_scores),
        aupr_out=average_precision(ood_scores, id_scores),
        fpr95=fpr_at_tpr(id_scores, ood_scores),
    )


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError(f"need rows of both classes, got {len(id_scores)} in-distribution and {len(ood_scores)} OOD")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("scores must be finite; drop error rows before computing metrics")
    return id_scores, ood_scores
