"""Counter-based per-row noise: a pure function of the seed, whatever the batch."""

import torch

from fimood.models import noise


def test_same_seed_gives_same_noise_in_any_batch():
    seeds = torch.tensor([5, -3, 2**62, 7])
    batch = noise.uniform(seeds, (3, 4))
    alone = noise.uniform(seeds[2:3], (3, 4))
    torch.testing.assert_close(batch[2:3], alone)


def test_uniform_lies_in_open_unit_interval_with_uniform_moments():
    values = noise.uniform(torch.arange(64), (1000,), dtype=torch.float64)
    assert values.min() > 0 and values.max() < 1
    assert abs(values.mean().item() - 0.5) < 0.01
    assert abs(values.var().item() - 1 / 12) < 0.005


def test_different_seeds_and_streams_are_uncorrelated():
    values = noise.uniform(torch.tensor([1, 2]), (5000,), dtype=torch.float64)
    other_stream = noise.uniform(torch.tensor([1]), (5000,), stream=1, dtype=torch.float64)
    assert abs(torch.corrcoef(values)[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(torch.stack([values[0], other_stream[0]]))[0, 1].item()) < 0.05


def test_normal_has_standard_moments():
    values = noise.normal(torch.arange(32), (2000,), dtype=torch.float64)
    assert abs(values.mean().item()) < 0.02
    assert abs(values.std().item() - 1) < 0.02


def test_noise_works_inside_vmap():
    seeds = torch.tensor([11, 12, 13])
    mapped = torch.func.vmap(lambda s: noise.uniform(s[None], (4,))[0])(seeds)
    torch.testing.assert_close(mapped, noise.uniform(seeds, (4,)))
