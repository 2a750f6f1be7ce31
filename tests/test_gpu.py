"""On a CUDA device: same noise and features as on the CPU, and every engine exact there too."""

import pytest
import torch
from conftest import assert_rel_close, tiny_glow

from fimood.engine import grad_norms
from fimood.models import Glow, noise

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_noise_is_bitwise_identical_on_cpu_and_gpu():
    seeds = torch.tensor([0, 1, -7, 2**62])
    torch.testing.assert_close(
        noise.uniform(seeds.cuda(), (3, 16, 16)).cpu(), noise.uniform(seeds, (3, 16, 16)), rtol=0, atol=0
    )


@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_engines_equal_loop_on_gpu(method):
    torch.manual_seed(0)
    model = Glow.from_preset("small").double().cuda()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64, device="cuda")
    model.initialize(x)
    seeds = torch.arange(4, device="cuda")
    assert_rel_close(grad_norms(model, x, seeds, method).sq_norms, grad_norms(model, x, seeds, "loop").sq_norms)


def test_features_on_gpu_equal_features_on_cpu():
    model = tiny_glow()
    x, seeds = torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.arange(5)
    cpu = grad_norms(model, x, seeds, "hooks").sq_norms
    gpu = grad_norms(model.cuda(), x.cuda(), seeds.cuda(), "hooks").sq_norms.cpu()
    assert_rel_close(gpu, cpu, rtol=1e-9)
