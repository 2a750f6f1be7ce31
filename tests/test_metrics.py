"""Detection metrics agree with scikit-learn's definitions, ties included."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fimood.method.metrics import detection_metrics


def test_metrics_match_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(size=400).round(1), (rng.normal(size=300) + 0.7).round(1)
    labels = np.r_[np.zeros(400), np.ones(300)]
    scores = np.r_[id_scores, ood_scores]
    metrics = detection_metrics(id_scores, ood_scores)
    assert metrics.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.aupr_out == pytest.approx(average_precision_score(labels, scores))
    assert metrics.aupr_in == pytest.approx(average_precision_score(1 - labels, -scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    assert metrics.fpr95 == pytest.approx(fpr[np.searchsorted(tpr, 0.95)])


def test_perfect_separation():
    metrics = detection_metrics(np.zeros(10), np.ones(10))
    assert (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr95) == (1.0, 1.0, 1.0, 0.0)


def test_empty_or_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="need rows of both classes"):
        detection_metrics(np.zeros(0), np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        detection_metrics(np.array([np.nan]), np.ones(3))
