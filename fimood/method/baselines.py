"""The baselines the gradient method is compared with: likelihood and the Typicality test."""

from __future__ import annotations

import numpy as np


def likelihood_ood_score(nll: np.ndarray) -> np.ndarray:
    """OOD score of the likelihood baseline: the NLL itself (less likely = more OOD), shape (n,)."""
    return np.asarray(nll, dtype=np.float64)


def baseline_scores(typicality: TypicalityTest, nll: np.ndarray) -> dict[str, np.ndarray]:
    """Both likelihood baselines' OOD scores (higher = more OOD) for the same rows or groups."""
    return {"typicality": typicality.ood_score(nll), "likelihood": likelihood_ood_score(nll)}


class TypicalityTest:
    """Nalisnick et al. (2019): how far a row's (or group's mean) NLL is from the fit set's mean NLL.

    Attributes (after fit): entropy_, the mean NLL Ĥ over the fit set.
    """

    def fit(self, nll: np.ndarray) -> TypicalityTest:
        """Fit on the (n,) NLLs of in-distribution rows."""
        nll = np.asarray(nll, dtype=np.float64)
        if nll.ndim != 1 or len(nll) == 0:
            raise ValueError(f"expected a non-empty (n,) array of NLLs, got shape {nll.shape}")
        self.entropy_ = float(nll.mean())
        return self

    @classmethod
    def from_entropy(cls, entropy: float) -> TypicalityTest:
        """A fitted test from a known mean NLL (a streamed fit, or a saved detector)."""
        test = cls()
        test.entropy_ = float(entropy)
        return test

    def ood_score(self, nll: np.ndarray) -> np.ndarray:
        """|NLL - Ĥ| per row; for groups of M rows, pass each group's mean NLL. Shape (n,)."""
        if not hasattr(self, "entropy_"):
            raise RuntimeError("this TypicalityTest is not fitted yet; call fit first")
        return np.abs(np.asarray(nll, dtype=np.float64) - self.entropy_)
