"""Training lowers the NLL; the benchmark measures every engine beside the plain step."""

from collections import Counter

import numpy as np
import pytest
import torch

from fimood.models import Glow
from fimood.models.training import TrainConfig, train
from fimood.onboarding.datasets import load_source
from fimood.research import benchmark


def test_training_lowers_bits_per_dim():
    torch.manual_seed(0)
    model = Glow.from_preset("tiny")
    losses = train(
        model,
        load_source("fashion-mnist", "test", limit=256).images,
        TrainConfig(steps=40, batch_size=32, warmup_steps=5),
        progress=False,
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_the_benchmark_times_every_engine_beside_the_plain_step_on_the_same_rows(monkeypatch):
    calls = Counter()
    real_grad_norms = benchmark.grad_norms

    def counted(model, x, seeds, method):
        calls[method, len(x)] += 1
        return real_grad_norms(model, x, seeds, method)

    monkeypatch.setattr(benchmark, "grad_norms", counted)
    rows = benchmark.run_benchmark(["tiny"], ["loop", "vmap", "hooks"], batch_size=16, loop_batch_size=4, repeats=2)
    assert [row.mode for row in rows] == ["plain", "loop", "vmap", "hooks"]
    assert calls == {("loop", 4): 3, ("vmap", 16): 3, ("hooks", 16): 3}  # one warm-up and two timed calls each
    by_mode = {row.mode: row for row in rows}
    for row in rows:
        assert row.slowdown == pytest.approx(by_mode["plain"].images_per_second / row.images_per_second)
    assert by_mode["loop"].slowdown > by_mode["hooks"].slowdown  # a backward pass per row costs more than one per batch
    assert "machine: test machine" in benchmark.format_rows(rows, "test machine")


def test_the_scale_benchmark_scores_both_layouts_on_loopback_s3_and_prints_their_ratio(ray_session, capsys):
    from fimood.cli import main

    assert main(["benchmark-scale", "--rows", "300", "--partitions", "30", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "1 partition x 300 rows" in out and "30 partitions x 10 rows" in out
    assert "per 1,000 partitions" in out and "30 partitions vs 1 partition (medians of rows/s):" in out
