"""The model replicas: GPUs asked for when the cluster has them or can add them, and a batch the device has
no memory for halved until it fits, the same features as if it had fitted, and said in the summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import pixel_gaussian_nll, read_scores
from torch import Tensor, nn

from fimood import passes
from fimood.lake.tables import write_image_parquet
from fimood.method.features import featurize_rows
from fimood.models import register_model, save_model
from fimood.models.base import ConfiguredModel, Preset
from fimood.onboarding.datasets import load_source
from fimood.passes.actors import gpus_per_actor


@dataclass(frozen=True)
class ShortOfMemoryConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    max_rows: int | None = None  # a batch of more rows than this runs out of "device memory"; None: no limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))


@register_model
class ShortOfMemory(ConfiguredModel):
    """A per-pixel Gaussian on a device with room for `max_rows` rows at once, out of memory as torch reports
    it on a GPU. Unlimited by default: the tests over every registered model train it as any other."""

    model_type = "test-short-of-memory"
    config_class = ShortOfMemoryConfig
    presets: ClassVar[dict[str, Preset]] = {"tiny": Preset({})}

    def __init__(self, config: ShortOfMemoryConfig | None = None):
        super().__init__()
        self.config = config or ShortOfMemoryConfig()
        self.scale = nn.Conv2d(1, 1, 3, padding=1)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        if self.config.max_rows is not None and len(x) > self.config.max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory: tried to allocate {len(x)} rows")
        return pixel_gaussian_nll(self.scale, x)


def test_a_batch_the_device_has_no_memory_for_is_halved_until_it_fits():
    torch.manual_seed(0)
    model = ShortOfMemory(ShortOfMemoryConfig(max_rows=8))
    rows = load_source("mnist", limit=32)
    errors = [None] * 32
    halved = featurize_rows(model, rows.ids, rows.images, errors)
    assert halved.memory_splits == 3 and halved.errors == errors  # 32 → 16 + 16 → four batches of 8
    fitting = [featurize_rows(model, rows.ids[i : i + 8], rows.images[i : i + 8], errors[:8]) for i in range(0, 32, 8)]
    np.testing.assert_allclose(halved.log_sq_norms, np.concatenate([f.log_sq_norms for f in fitting]), rtol=1e-12)


def test_one_row_the_device_has_no_memory_for_is_an_error_row():
    model = ShortOfMemory(ShortOfMemoryConfig(max_rows=0))
    rows = load_source("mnist", limit=2)
    result = featurize_rows(model, rows.ids, rows.images, [None, None])
    assert all("OutOfMemoryError" in error for error in result.errors)


def test_the_passes_say_how_often_batches_were_halved(ray_session, tmp_path):
    torch.manual_seed(0)
    save_model(ShortOfMemory(ShortOfMemoryConfig(max_rows=8)), str(tmp_path / "model"))
    fashion = load_source("fashion-mnist", "test", limit=120)
    write_image_parquet(str(tmp_path / "fit"), fashion.ids[:80], fashion.images[:80], rows_per_shard=40)
    write_image_parquet(str(tmp_path / "lake" / "d"), fashion.ids[80:], fashion.images[80:], rows_per_shard=40)
    detector, fitted = passes.fit(str(tmp_path / "model"), str(tmp_path / "fit"), passes.PipelineConfig(batch_size=32))
    assert fitted.rows == 80 and fitted.errors == 0 and fitted.memory_splits > 0
    assert f"batches halved {fitted.memory_splits} times" in str(fitted)
    detector.save(str(tmp_path / "detector"))
    summary = passes.score(
        str(tmp_path / "detector"), str(tmp_path / "lake"), str(tmp_path / "out"), passes.PipelineConfig(batch_size=32)
    )
    assert summary.rows == 40 and summary.errors == 0 and "as the GPU ran out of memory" in str(summary)
    assert read_scores(str(tmp_path / "out")).column("error").null_count == 40


def test_replicas_ask_for_the_gpus_given_else_for_none_on_a_cluster_without_any(ray_session):
    """The test cluster has no GPU and no autoscaler (a local Ray): replicas run on CPUs unless told."""
    assert gpus_per_actor(passes.PipelineConfig()) == 0.0
    assert gpus_per_actor(passes.PipelineConfig(gpus_per_actor=0.25)) == 0.25
    for wrong in (-1.0, 1.5):
        with pytest.raises(ValueError, match="gpus_per_actor must be a share of one GPU"):
            passes.PipelineConfig(gpus_per_actor=wrong)
    with pytest.raises(ValueError, match=r"max_actors \(1\) must be at least num_actors \(2\)"):
        passes.PipelineConfig(num_actors=2, max_actors=1)
