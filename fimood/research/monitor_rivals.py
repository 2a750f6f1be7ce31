"""The monitor study's rival batch (whole-night) shift tests, over per-row arrays computed once.

Every rival follows Alibi Detect's and scikit-learn's pattern: the constructor stores parameters,
`fit(reference rows) -> self` learns from the reference rows only, and `p_value(night rows) -> float`
tests one night. The study computes each row's features (NLL, pixels, a classifier's softmax and
embedding) once and its nights index into them, so every rival takes plain arrays and is cheap per night.
`train_classifier` and `classifier_outputs` make the small FashionMNIST classifier that BBSD and
MMDDrift read.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch
from torch import nn

__all__ = [
    "BBSD",
    "DEFAULT_CLASSIFIER_STEPS",
    "MMDDrift",
    "PixelPCAHotelling",
    "SmallCNN",
    "TypicalityBatchTest",
    "classifier_outputs",
    "train_classifier",
]

DEFAULT_CLASSIFIER_STEPS = 1000


def _rows(name: str, array, ndim: int | None = None, min_rows: int = 1) -> np.ndarray:
    """`array` as float64 rows, checked: `ndim` dimensions (any if None, at least 1), `min_rows` rows, finite."""
    array = np.asarray(array)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.ndim == 0:
        raise ValueError(f"{name} must be an array of rows, got a scalar")
    if array.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row(s), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values")
    return array


def _require_fitted(detector, attribute: str) -> None:
    if getattr(detector, attribute, None) is None:
        raise RuntimeError(f"{type(detector).__name__} is not fitted: call fit(reference rows) first")


class TypicalityBatchTest:
    """Nalisnick et al. 2019's typicality test of a night's mean NLL (resolution 1/(n_bootstrap + 1)).

    Nalisnick, Matsukawa, Teh, Lakshminarayanan, "Detecting out-of-distribution inputs to deep generative
    models using typicality" (arXiv:1906.02994): Ĥ is the mean NLL of the fit rows; a night of n rows has the
    statistic |mean NLL of the night − Ĥ|; its null distribution is the paper's bootstrap, the same statistic
    over `n_bootstrap` batches of n rows drawn with replacement from the calibration rows' NLL. The p-value is
    (1 + #bootstraps ≥ observed) / (1 + n_bootstrap), so it is never below 1/(n_bootstrap + 1). The bootstrap
    is seeded by (seed, n) and cached per night size, so nights of one size share it and a night's p-value does
    not depend on which nights came before.

    Caveat of the procedure itself (kept, as the paper's): the bootstrap batches centre on the calibration
    rows' mean, not on the population's, so the null spread carries the calibration mean's own error
    (variance σ²/m for m calibration rows), which does not shrink with n. For nights small against m the
    level is right; for nights as large as m or larger it is not. Measured with Gaussian NLL, 4,000 fit and
    500 calibration rows, 40 references × 20 null nights, rejections at p ≤ 0.05: 2.0% at 1,000-row nights
    (72% of references never reject), 6.6% at 10,000 rows, where 10% of references reject a quarter or more
    of their null nights.
    """

    def __init__(self, n_bootstrap: int = 1000, seed: int = 0):
        if n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)
        self.entropy_: float | None = None
        self.calibration_nll_: np.ndarray | None = None
        self._null: dict[int, np.ndarray] = {}

    def fit(self, fit_nll: np.ndarray, calibration_nll: np.ndarray) -> TypicalityBatchTest:
        """Learn Ĥ from the fit rows' NLL (n_fit,) and keep the calibration rows' NLL (m,) to bootstrap."""
        fit_nll = _rows("fit_nll", fit_nll, ndim=1)
        self.calibration_nll_ = _rows("calibration_nll", calibration_nll, ndim=1, min_rows=2).copy()
        self.entropy_ = float(fit_nll.mean())
        self._null = {}
        return self

    def null_statistics(self, n: int) -> np.ndarray:
        """The sorted bootstrap statistics (n_bootstrap,) for nights of n rows, computed once per n."""
        _require_fitted(self, "entropy_")
        if n not in self._null:
            self._null[n] = self._bootstrap(n)
        return self._null[n]

    def _bootstrap(self, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, n])
        calibration = self.calibration_nll_
        chunk = max(1, 2_000_000 // n)  # bootstraps per chunk: at most ~2M indices in memory
        means = np.empty(self.n_bootstrap)
        for start in range(0, self.n_bootstrap, chunk):
            stop = min(start + chunk, self.n_bootstrap)
            means[start:stop] = calibration[rng.integers(0, len(calibration), size=(stop - start, n))].mean(axis=1)
        return np.sort(np.abs(means - self.entropy_))

    def statistic(self, night_nll: np.ndarray) -> float:
        """|mean NLL of the night (n,) − Ĥ|."""
        _require_fitted(self, "entropy_")
        return float(abs(_rows("night_nll", night_nll, ndim=1).mean() - self.entropy_))

    def p_value(self, night_nll: np.ndarray) -> float:
        """The bootstrap p-value of a night's NLL (n,), n its row count."""
        observed = self.statistic(night_nll)
        null = self.null_statistics(len(night_nll))
        at_least = len(null) - np.searchsorted(null, observed, side="left")
        return float((1 + at_least) / (1 + self.n_bootstrap))


class PixelPCAHotelling:
    """Hotelling's T² of a night's mean on the first k principal components of the pixels, fit rows' covariance.

    Hotelling 1931, two-sample form with the reference's covariance (e.g. Anderson, *An Introduction to
    Multivariate Statistical Analysis*, §5.2). Everything is learned from the fit rows alone: their mean μ,
    the PCA's first k directions V (k, d), and the PC scores' covariance S, which is diagonal in that basis,
    S = diag(λ_i), the fit rows' covariance's k largest eigenvalues. For a night of n rows,
    d̄ = V(x̄_night − μ) is the night's mean PC score against the fit rows' (which is 0). Its variance is
    Σ(1/n + 1/n_fit): the night's own error and the fitted mean's, which does not shrink with n. So

        T² = (n · n_fit / (n + n_fit)) · d̄ᵀ S⁻¹ d̄,      F = (n_fit − k) / (k · (n_fit − 1)) · T²,

    and the p-value is P(F(k, n_fit − k) ≥ F). Why F(k, n_fit − k): under the null with Gaussian rows,
    z = √(n · n_fit / (n + n_fit)) · d̄ ~ N_k(0, Σ) is independent of (n_fit − 1)·S ~ Wishart_k(Σ, n_fit − 1)
    (a Gaussian sample's mean and covariance are independent, and the night is independent of the fit rows),
    so T² = zᵀS⁻¹z is Hotelling's T²(k, ν = n_fit − 1) and (ν − k + 1)/(kν) · T² ~ F(k, ν − k + 1). The PCs
    are chosen from the same S, whose top sample eigenvalues overstate the variance along them, which makes
    the test conservative: slightly when the spectrum decays as pixels' does (4.7% at p ≤ 0.05 over 300 null
    nights, 64 values decaying as 1/i, k = 10), and badly when it is flat over the first k (0%). A night's
    mean of many rows is near-Gaussian whatever the pixels are.
    Rows may be images (N, 1, 28, 28) or flat (N, d); a night's rows must have the fit rows' shape.
    """

    def __init__(self, n_components: int = 50):
        if n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}")
        self.n_components = int(n_components)
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.variances_: np.ndarray | None = None
        self.n_fit_: int | None = None
        self.row_shape_: tuple[int, ...] | None = None

    def fit(self, fit_pixels: np.ndarray) -> PixelPCAHotelling:
        """Fit the PCA, mean and covariance on the fit rows' pixels (n_fit, ...), n_fit > n_components."""
        pixels = _rows("fit_pixels", fit_pixels, min_rows=self.n_components + 1)
        flat = pixels.reshape(len(pixels), -1)
        k = self.n_components
        if flat.shape[1] < k:
            raise ValueError(f"fit_pixels has {flat.shape[1]} values per row, fewer than n_components={k}")
        mean = flat.mean(axis=0)
        centred = flat - mean
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (len(flat) - 1))  # d × d, cheaper than SVD
        variances, directions = eigenvalues[::-1][:k], eigenvectors[:, ::-1].T
        if variances[-1] <= 1e-10 * variances[0]:
            raise ValueError(f"the fit rows vary in fewer than n_components={k} directions")
        self.mean_, self.components_, self.variances_ = mean, directions[:k], variances
        self.n_fit_, self.row_shape_ = len(flat), pixels.shape[1:]
        return self

    def statistic(self, night_pixels: np.ndarray) -> float:
        """Hotelling's T² of the night's pixels (n, ...), the fit rows' shape per row."""
        _require_fitted(self, "mean_")
        night = _rows("night_pixels", night_pixels)
        if night.shape[1:] != self.row_shape_:
            raise ValueError(f"night_pixels rows have shape {night.shape[1:]}, the fit rows' are {self.row_shape_}")
        n = len(night)
        shift = self.components_ @ (night.reshape(n, -1).mean(axis=0) - self.mean_)
        return float(n * self.n_fit_ / (n + self.n_fit_) * np.sum(shift**2 / self.variances_))

    def p_value(self, night_pixels: np.ndarray) -> float:
        """P(F(k, n_fit − k) ≥ (n_fit − k)/(k(n_fit − 1)) · T²) for the night's pixels (n, ...)."""
        k, n_fit = self.n_components, self.n_fit_
        t_squared = self.statistic(night_pixels)
        return float(scipy.stats.f.sf((n_fit - k) / (k * (n_fit - 1)) * t_squared, k, n_fit - k))


class BBSD:
    """Black-box shift detection: a KS test per softmax output, Bonferroni over outputs (Rabanser et al. 2019).

    Rabanser, Günnemann, Lipton, "Failing loudly: an empirical study of methods for detecting dataset shift"
    (NeurIPS 2019), BBSDs: a two-sample Kolmogorov–Smirnov test of each of the c softmax outputs, the
    reference rows' against the night's, and the night's p-value min(1, c · min_j p_j). Each p_j is exactly
    `scipy.stats.ks_2samp(reference[:, j], night[:, j], method="asymp").pvalue`, computed against the
    reference's outputs sorted once at fit.
    """

    def __init__(self):
        self.sorted_reference_: np.ndarray | None = None

    def fit(self, reference_outputs: np.ndarray) -> BBSD:
        """Keep the reference rows' softmax outputs (n_ref, c), sorted per output."""
        reference = _rows("reference_outputs", reference_outputs, ndim=2)
        if reference.shape[1] < 1:
            raise ValueError("reference_outputs has no outputs (shape (n_ref, 0))")
        self.sorted_reference_ = np.ascontiguousarray(np.sort(reference, axis=0).T)  # (c, n_ref)
        return self

    def output_p_values(self, night_outputs: np.ndarray) -> np.ndarray:
        """The KS p-value (c,) of each output, for the night's softmax outputs (n, c)."""
        _require_fitted(self, "sorted_reference_")
        night = _rows("night_outputs", night_outputs, ndim=2)
        n_outputs, n_ref = self.sorted_reference_.shape
        if night.shape[1] != n_outputs:
            raise ValueError(f"night_outputs has {night.shape[1]} outputs, the reference has {n_outputs}")
        sorted_night = np.sort(night, axis=0).T
        n = len(night)
        distances = np.empty(n_outputs)
        for j in range(n_outputs):
            reference, tonight = self.sorted_reference_[j], sorted_night[j]
            pooled = np.concatenate([reference, tonight])
            gap = np.searchsorted(reference, pooled, side="right") / n_ref
            gap -= np.searchsorted(tonight, pooled, side="right") / n
            distances[j] = np.abs(gap).max()
        effective = max(n, n_ref) * min(n, n_ref) / (n + n_ref)  # as ks_2samp's asymptotic method
        return scipy.stats.kstwo.sf(distances, np.round(effective))

    def p_value(self, night_outputs: np.ndarray) -> float:
        """Bonferroni's p-value over outputs, for the night's softmax outputs (n, c)."""
        p_values = self.output_p_values(night_outputs)
        return float(min(1.0, len(p_values) * p_values.min()))


class MMDDrift:
    """Gaussian-kernel MMD with a permutation p-value (Gretton et al. 2012), on random Fourier features.

    As Alibi Detect's MMDDrift (its kernel exp(−‖x − y‖²/(2σ²)) with σ² = median(‖x − y‖²)/2 over pairs of
    reference rows, its permutation p-value), but written here: alibi-detect 0.13 requires numpy < 2 (this
    project runs numpy 2), numba < 0.60 and transformers and opencv, and its exact kernel matrix costs
    O((n + n_ref)²) per permutation, too slow at 10,000-row nights. Instead the kernel is approximated by D
    random Fourier features (Rahimi and Recht 2007), φ(x) = √(2/D) · cos(Wx + b), W ~ N(0, σ⁻²), b ~ U(0, 2π),
    with σ and W fixed at fit from the reference rows (σ from at most `bandwidth_rows` of them). The statistic
    is ‖mean φ(night) − mean φ(reference)‖², the biased MMD² estimate under the approximate kernel, and the
    p-value is (1 + #permutations ≥ observed) / (1 + n_permutations) over seeded permutations of the pooled
    rows (never below 1/(n_permutations + 1)). The permutations are seeded by (seed, n) and cached per night
    size ((n_permutations + 1) × (n_ref + n) float32 weights), so a night's p-value is a function of the night.
    """

    def __init__(self, n_features: int = 256, n_permutations: int = 200, seed: int = 0, bandwidth_rows: int = 1000):
        if n_features < 1 or n_permutations < 1 or bandwidth_rows < 2:
            raise ValueError(
                f"need n_features >= 1, n_permutations >= 1, bandwidth_rows >= 2; got {n_features}, "
                f"{n_permutations}, {bandwidth_rows}"
            )
        self.n_features = int(n_features)
        self.n_permutations = int(n_permutations)
        self.seed = int(seed)
        self.bandwidth_rows = int(bandwidth_rows)
        self.bandwidth_: float | None = None
        self._weights: dict[int, np.ndarray] = {}

    def fit(self, reference_embedding: np.ndarray) -> MMDDrift:
        """Fix the bandwidth and the features on the reference rows' embedding (n_ref, d), keep their features."""
        reference = _rows("reference_embedding", reference_embedding, ndim=2, min_rows=2)
        rng = np.random.default_rng(self.seed)
        sample = reference
        if len(reference) > self.bandwidth_rows:
            sample = reference[rng.choice(len(reference), self.bandwidth_rows, replace=False)]
        squared = np.sum(sample**2, axis=1)
        distances = squared[:, None] + squared[None, :] - 2 * sample @ sample.T
        median = float(np.median(np.maximum(distances[np.triu_indices(len(sample), k=1)], 0.0)))
        if median <= 0:
            raise ValueError("reference_embedding rows are (almost all) identical: no bandwidth")
        self.bandwidth_ = float(np.sqrt(median / 2))
        self.frequencies_ = rng.normal(scale=1 / self.bandwidth_, size=(reference.shape[1], self.n_features))
        self.phases_ = rng.uniform(0, 2 * np.pi, size=self.n_features)
        self.reference_features_ = self._features(reference)
        self._weights = {}
        return self

    def _features(self, rows: np.ndarray) -> np.ndarray:
        return np.sqrt(2 / self.n_features) * np.cos(rows @ self.frequencies_ + self.phases_)

    def _permutation_weights(self, n: int) -> np.ndarray:
        """(n_permutations + 1, n_ref + n) float32: row 0 the night itself (its rows last), then permutations;
        a row's weights are 1/n on its night's rows and −1/n_ref on the others, so weights @ φ is the mean gap."""
        if n not in self._weights:
            n_ref = len(self.reference_features_)
            identity = np.concatenate([np.full(n_ref, -1 / n_ref), np.full(n, 1 / n)]).astype(np.float32)
            rng = np.random.default_rng([self.seed, n])
            permuted = rng.permuted(np.tile(identity, (self.n_permutations, 1)), axis=1)
            self._weights[n] = np.vstack([identity, permuted])
        return self._weights[n]

    def statistics(self, night_embedding: np.ndarray) -> np.ndarray:
        """The statistic of the night (n, d) then of each permutation: (n_permutations + 1,)."""
        _require_fitted(self, "bandwidth_")
        night = _rows("night_embedding", night_embedding, ndim=2)
        if night.shape[1] != self.frequencies_.shape[0]:
            raise ValueError(
                f"night_embedding has {night.shape[1]} dimensions, the reference has {self.frequencies_.shape[0]}"
            )
        pooled = np.vstack([self.reference_features_, self._features(night)])
        pooled = (pooled - pooled.mean(axis=0)).astype(np.float32)  # weights sum to 0: centring only helps rounding
        gaps = self._permutation_weights(len(night)) @ pooled
        return np.sum(gaps.astype(np.float64) ** 2, axis=1)

    def p_value(self, night_embedding: np.ndarray) -> float:
        """The permutation p-value of the night's embedding (n, d)."""
        statistics = self.statistics(night_embedding)
        return float((1 + np.sum(statistics[1:] >= statistics[0])) / (1 + self.n_permutations))


class SmallCNN(nn.Module):
    """Two 3×3 conv layers (16, 32 channels, each ReLU and 2×2 max-pool), a 32-wide ReLU penultimate, 10 logits."""

    def __init__(self, n_classes: int = 10, width: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28) or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"images must be uint8 of shape (N, 1, 28, 28), N > 0; got {images.dtype} {images.shape}")
    return images


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    steps: int = DEFAULT_CLASSIFIER_STEPS,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
) -> SmallCNN:
    """Train a SmallCNN on images (N, 1, 28, 28) uint8 and labels (N,) in 0..9 with Adam on CPU; in eval mode.

    Seeded: the initialisation (without touching torch's global generator) and the batches, drawn with
    replacement. Uses torch's current thread count; set it (torch.set_num_threads) as the machine allows."""
    images = _images(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels must be in 0..9, got {labels.min()}..{labels.max()}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(labels.astype(np.int64))
    model.train()
    for _ in range(steps):
        batch = rng.integers(0, len(images), size=batch_size)
        loss = nn.functional.cross_entropy(model(_to_input(images[batch])), targets[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def classifier_outputs(model: SmallCNN, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A SmallCNN's softmax (N, 10) and penultimate embedding (N, 32), float32, for images (N, 1, 28, 28) uint8."""
    images = _images(images)
    was_training = model.training
    model.eval()
    softmax, embedding = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                features = model.embed(_to_input(images[start : start + batch_size]))
                softmax.append(torch.softmax(model.head(features), dim=1).numpy())
                embedding.append(features.numpy())
    finally:
        model.train(was_training)
    return np.concatenate(softmax), np.concatenate(embedding)
