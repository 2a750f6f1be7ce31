"""One registry of models: every model declares its name, presets, image shapes and checkpoint layout, and
whatever lists or loads models reads the registry. A fourth model, added here with nothing else
changed, trains, fits and scores from the command line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_scores
from torch import Tensor, nn

from fimood.cli import main
from fimood.models import MODELS, build_model, load_model, model_class, register_model
from fimood.models.base import ConfiguredModel, Preset, validate_images


@dataclass(frozen=True)
class ToyConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    hidden_channels: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))


TOY_PRESETS = {"tiny": Preset({"hidden_channels": 2}), "small": Preset({"hidden_channels": 4})}


@register_model
class ToyModel(ConfiguredModel):
    """A per-pixel Gaussian whose mean and scale come from a two-layer convolution of the image itself."""

    model_type = "toy"
    config_class = ToyConfig
    presets = TOY_PRESETS

    def __init__(self, config: ToyConfig | None = None):
        super().__init__()
        self.config = config = config or ToyConfig()
        channels = config.image_shape[0]
        self.features = nn.Conv2d(channels, config.hidden_channels, 3, padding=1)
        self.head = nn.Conv2d(config.hidden_channels, 2 * channels, 1)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        validate_images(x, self.config.image_shape)
        mean, log_scale = self.head(F.relu(self.features(x))).chunk(2, dim=1)
        log_prob = -0.5 * ((x - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
        return -log_prob.flatten(1).mean(1)


def test_every_built_in_model_is_registered_with_its_presets_and_their_image_shapes():
    assert {"glow", "vae", "ddpm"} <= set(MODELS)
    assert set(MODELS["glow"].presets) == {"tiny", "small", "paper"} and set(MODELS["vae"].presets) == {"tiny", "small"}
    assert build_model("glow", "paper").image_shape == (3, 32, 32)
    assert build_model("vae", "tiny", (3, 8, 8)).image_shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"vae presets are \['small', 'tiny'\], got 'paper'"):
        build_model("vae", "paper")
    with pytest.raises(ValueError, match="model must be one of"):
        model_class("unknown")


def test_a_second_class_cannot_take_a_registered_name():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        class Impostor(ToyModel):
            model_type = "glow"


def test_the_cli_offers_the_registered_models_and_refuses_a_preset_the_model_lacks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy" in capsys.readouterr().out
    code = main(["train", "--model", "vae", "--preset", "paper", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["fimood train: error: --preset paper is not a vae preset; vae has tiny, small"]


def test_a_model_added_to_the_registry_trains_fits_and_scores_from_the_cli(ray_session, tmp_path, capsys):
    d = str(tmp_path)
    main(["data", "fashion-mnist", "--out", f"{d}/train", "--limit", "96"])
    main(["data", "fashion-mnist", "--out", f"{d}/fit", "--limit", "80"])
    main(["data", "mnist", "--out", f"{d}/mnist/date=2026-11-26", "--limit", "20"])
    train = ["train", "--model", "toy", "--preset", "tiny", "--steps", "5", "--batch-size", "16"]
    assert main([*train, "--data", f"{d}/train", "--out", f"{d}/model"]) == 0
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "toy"
    assert isinstance(load_model(f"{d}/model"), ToyModel)
    assert main(["fit", "--model", f"{d}/model", "--data", f"{d}/fit", "--out", f"{d}/detector"]) == 0
    assert main(["score", "--detector", f"{d}/detector", "--data", f"{d}/mnist", "--out", f"{d}/scores"]) == 0
    assert "score: 20 rows (0 errors)" in capsys.readouterr().out
    scores = read_scores(f"{d}/scores")
    assert scores.num_rows == 20 and np.isfinite(scores.column("ood_score").to_numpy()).all()
