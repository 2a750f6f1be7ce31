"""The bundled demo sources load from local packages, with stable ids."""

import numpy as np
import pytest

from fimood.onboarding import datasets as data


def test_fashion_mnist_test_split():
    source = data.load_source("fashion-mnist", "test", limit=100)
    assert source.images.shape == (100, 1, 28, 28) and source.images.dtype == np.uint8
    assert source.ids[:2] == ["fashion-mnist/test/00000", "fashion-mnist/test/00001"]
    assert set(source.labels) <= set(range(10))


def test_mnist_subset_and_upsampled_digits():
    mnist = data.load_source("mnist")
    digits = data.load_source("digits")
    assert mnist.images.shape == (5000, 1, 28, 28)
    assert digits.images.shape == (1797, 1, 28, 28) and digits.images.max() == 255


def test_unknown_source_or_split_is_named():
    with pytest.raises(ValueError, match="'cifar'"):
        data.load_source("cifar")
    with pytest.raises(ValueError, match="mnist has splits"):
        data.load_source("mnist", "train")


def test_missing_fashion_mnist_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_source("fashion-mnist")
