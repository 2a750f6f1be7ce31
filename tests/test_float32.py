"""Numerics. Float32, as the pipeline runs: every engine against the float64 one-backward-per-sample loop, on
every registered model after training on FashionMNIST (trained gradients are small and cancel; random ones
do not). A non-finite result is its row's error.

Stated tolerance: |log‖g‖²(float32) − log‖g‖²(float64 loop)| ≤ 1e-3 for every row and tensor, i.e. squared
norms within 0.1%. `pytest tests/test_float32.py -s` prints the gaps measured (docs/results.md has them).
"""

import copy

import numpy as np
import pytest
import torch

from fimood.engine import METHODS, grad_norms
from fimood.models.base import pixels
from fimood.models.registry import MODELS
from fimood.models.training import TrainConfig, train
from fimood.onboarding.datasets import load_source

LOG_NORM_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    return load_source("fashion-mnist", "train", limit=1000).images


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_every_engine_in_float32_matches_the_float64_loop_on_a_trained_model(fashion, model_type):
    torch.manual_seed(0)
    model = MODELS[model_type].from_preset("tiny", (1, 28, 28))
    train(model, fashion, TrainConfig(steps=40, batch_size=32, warmup_steps=10), progress=False)
    x, seeds = pixels(fashion[:6], torch.float64, "cpu"), torch.arange(6)
    reference = grad_norms(copy.deepcopy(model).double(), x, seeds, "loop").sq_norms.log()
    assert torch.isfinite(reference).all()
    for method in METHODS:
        got = grad_norms(copy.deepcopy(model).float(), x.float(), seeds, method).sq_norms.double().log()
        gap = float((got - reference).abs().max())
        print(f"float32 {model_type} {method}: largest log-norm gap {gap:.1e}")  # the figure `-s` shows
        assert gap <= LOG_NORM_TOLERANCE, f"{model_type}, {method} in float32: log-norms off by {gap:.2e}"


def test_a_non_finite_loss_or_gradient_is_that_rows_error_never_a_nan_score():
    """A model that gives NaN for one row (here: an all-white image) fails that row alone."""
    from conftest import OddUserModel

    from fimood.method.features import featurize_rows

    class NaNOnWhite(OddUserModel):
        def nll(self, x, seeds=None):
            return super().nll(x, seeds) + torch.where(x.flatten(1).mean(1) > 0.99, float("nan"), 0.0)

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 200, size=(3, 1, 4, 6), dtype=np.uint8)
    images[1] = 255
    rows = featurize_rows(NaNOnWhite().double(), ["a", "b", "c"], images, [None] * 3)
    assert rows.errors == [None, "the model gave a non-finite NLL or gradient", None]
    assert np.isfinite(rows.log_sq_norms[[0, 2]]).all() and np.isfinite(rows.nll[[0, 2]]).all()
