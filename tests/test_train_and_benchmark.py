"""Training lowers the NLL; the benchmark measures every engine beside the plain step."""

import numpy as np
import torch

from fimood.benchmark import format_rows, run_benchmark
from fimood.data import load_source
from fimood.models import Glow, GlowConfig
from fimood.train import TrainConfig, train


def test_training_lowers_bits_per_dim():
    torch.manual_seed(0)
    model = Glow(GlowConfig.preset("tiny"))
    losses = train(
        model,
        load_source("fashion-mnist", "test", limit=256).images,
        TrainConfig(steps=40, batch_size=32, warmup_steps=5),
        progress=False,
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_benchmark_reports_each_engine_relative_to_the_plain_step():
    rows = run_benchmark(["tiny"], ["loop", "vmap"], batch_size=4, loop_batch_size=2, repeats=1)
    assert [row.mode for row in rows] == ["plain", "loop", "vmap"]
    assert rows[0].slowdown == 1.0 and all(row.images_per_second > 0 for row in rows)
    assert "machine: " in format_rows(rows, "test machine")
