"""Your own model: the adapter for any nn.Module, and checkpoints that name an allow-listed class."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from torch import nn

from fimood import GradNormDetector
from fimood.engine import grad_norms
from fimood.method.features import compute_features
from fimood.models import ModelAdapter, load_model, save_model

USER_PACKAGE = '''
import torch
from torch import nn

from fimood.models import LikelihoodModel


class TinyFlow(LikelihoodModel):
    """A user's model: a per-pixel affine flow with a small conv net for the shift."""

    def __init__(self, channels: int = 1, size: int = 6):
        super().__init__()
        self.channels, self.size = channels, size
        self.shift = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, channels, 1))
        self.log_scale = nn.Parameter(torch.zeros(channels, size, size))

    @property
    def image_shape(self):
        return (self.channels, self.size, self.size)

    def config_dict(self):
        return {"channels": self.channels, "size": self.size}

    def nll(self, x, seeds=None):
        z = (x - self.shift(x)) * torch.exp(self.log_scale)
        return (0.5 * z.pow(2) - self.log_scale).flatten(1).sum(1)


class NotAModel:
    def __init__(self, **config):
        raise RuntimeError("must never be constructed")
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """`my_models.flows` on sys.path, as a user's own package would be."""
    package = tmp_path / "my_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flows.py").write_text(textwrap.dedent(USER_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [name for name in sys.modules if name.startswith("my_models")]:
        del sys.modules[name]


def mlp_and_nll() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 16)).double()

    def nll(module: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * (module(x) - x.flatten(1)).pow(2).sum(1)

    return module, nll


@pytest.mark.parametrize("method", ["vmap", "hooks", "auto"])
def test_the_adapter_gives_any_module_exact_layerwise_gradients(method):
    model = ModelAdapter(*mlp_and_nll(), image_shape=(1, 4, 4))
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    loop = grad_norms(model, x, method="loop")
    assert loop.names == ["module.1.weight", "module.1.bias", "module.3.weight", "module.3.bias"]
    assert_rel_close(grad_norms(model, x, method=method).sq_norms, loop.sq_norms)


def test_the_adapter_feeds_a_detector():
    model = ModelAdapter(*mlp_and_nll(), image_shape=(1, 4, 4)).float()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 64, size=(60, 1, 4, 4), dtype=np.uint8)
    features = compute_features(model, images, [str(i) for i in range(60)])
    detector = GradNormDetector().fit(features.log_sq_norms[:40], features.log_sq_norms[40:])
    bright = compute_features(model, 255 - images[:10], [str(i) for i in range(10)])
    assert detector.ood_score(bright.log_sq_norms).mean() > detector.ood_score(features.log_sq_norms[40:]).mean()


def test_the_adapter_refuses_an_nll_function_that_does_not_give_one_value_per_row():
    model = ModelAdapter(nn.Linear(16, 1), lambda module, x, seeds: module(x.flatten(1)).sum(), image_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"nll_fn must return one value per row, shape \(2,\), got \(\)"):
        model.nll(torch.rand(2, 1, 4, 4))


def test_a_user_checkpoint_names_its_class_and_loads_when_its_package_is_allow_listed(user_package, tmp_path):
    from my_models.flows import TinyFlow

    torch.manual_seed(0)
    model = TinyFlow(size=6)
    sha256 = save_model(model, str(tmp_path / "ckpt"))
    config = (tmp_path / "ckpt" / "config.json").read_text()
    assert '"model_type": "my_models.flows:TinyFlow"' in config
    loaded = load_model(str(tmp_path / "ckpt"), allowed_imports=["my_models"])
    loaded_sha256 = loaded.checkpoint_sha256
    assert isinstance(loaded, TinyFlow) and loaded_sha256 == sha256
    x = torch.rand(3, 1, 6, 6)
    torch.testing.assert_close(loaded.nll(x), model.nll(x))
    assert_rel_close(
        grad_norms(loaded.double(), x.double(), method="hooks").sq_norms,
        grad_norms(loaded, x.double(), method="loop").sq_norms,
    )


def test_a_user_checkpoint_is_refused_before_import_unless_its_package_is_allow_listed(user_package, tmp_path):
    import json

    (tmp_path / "ckpt").mkdir()
    config = {"format_version": 1, "model_type": "my_models.flows:TinyFlow", "config": {}}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    for allowed in ([], ["my_model"], ["my_models_extra"], ["other", "my_models.flow"]):
        with pytest.raises(PermissionError, match="not allow-listed"):
            load_model(str(tmp_path / "ckpt"), allowed_imports=allowed)
    assert "my_models.flows" not in sys.modules  # refused before anything was imported


def test_a_checkpoint_may_only_name_a_likelihood_model(user_package, tmp_path):
    import json

    (tmp_path / "ckpt").mkdir()
    config = {"format_version": 1, "model_type": "my_models.flows:NotAModel", "config": {}}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match=r"must name a subclass of fimood\.LikelihoodModel"):
        load_model(str(tmp_path / "ckpt"), allowed_imports=["my_models"])
    config["model_type"] = "not-an-import-path"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'module:Class'"):
        load_model(str(tmp_path / "ckpt"))


def test_the_in_process_example_in_the_docs_runs():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "own-model.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(example, "docs/own-model.md", "exec"), namespace)
    assert namespace["features"].log_sq_norms.shape == (256, 4)
    assert namespace["detector"].rule_.name == "one-sided"
