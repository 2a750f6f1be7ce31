"""DDPM (on diffusers) and the VAE: exact gradients under every engine, seeded NLLs, checkpoints."""

import math
import sys

import numpy as np
import pytest
import torch
from conftest import assert_rel_close

from fimood.engine import explain, grad_norms
from fimood.models import DDPM, VAE, DDPMConfig, VAEConfig, load_model, save_model
from fimood.models.ddpm import import_diffusers
from fimood.models.vae import discretized_logistic_log_prob

diffusers = import_diffusers()  # the `test` extra installs it: these tests never skip


def tiny_ddpm(config: DDPMConfig | None = None) -> DDPM:
    torch.manual_seed(0)
    return DDPM.from_preset("tiny", (1, 8, 8), config).double()


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(image_shape=(1, 8, 8), hidden_channels=4, latent_dim=3)).double()


MODELS = {
    "ddpm": tiny_ddpm,
    "ddpm-two-steps-two-draws": lambda: tiny_ddpm(DDPMConfig(timesteps=(0, 10), n_draws=2)),
    "vae": tiny_vae,
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_every_engine_equals_the_loop_in_float64(name, method):
    model = MODELS[name]()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    seeds = torch.arange(3) + 7
    loop = grad_norms(model, x, seeds, "loop")
    result = grad_norms(model, x, seeds, method)
    assert result.names == loop.names
    assert_rel_close(result.sq_norms, loop.sq_norms)
    torch.testing.assert_close(result.nll, loop.nll)


def test_the_default_ddpm_and_the_vae_run_every_tensor_through_a_hooks_rule():
    for model in (tiny_ddpm(), tiny_vae()):
        reasons = explain(model, torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.arange(2))
        assert all(reason.startswith("rule") for reason in reasons.values()), reasons


@pytest.mark.parametrize("name", MODELS)
def test_a_rows_nll_does_not_depend_on_its_batch(name):
    model = MODELS[name]()
    x, seeds = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 6, 7])
    alone = torch.cat([model.nll(x[i : i + 1], seeds[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(model.nll(x, seeds), alone)
    assert not torch.equal(model.nll(x, seeds), model.nll(x, seeds + 1))  # the seed picks the noise


def test_ddpm_freezes_attention_key_biases_whose_gradient_is_zero():
    model = tiny_ddpm()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name.endswith("to_k.bias") for name in frozen)


def test_ddpm_nll_is_the_bound_weighted_noise_error_at_the_least_noisy_step():
    model = tiny_ddpm()
    x, seeds = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    t = torch.zeros(2, dtype=torch.long)
    beta = model.betas[0].double()
    expected = model.noise_error(x, seeds, t, stream=0) * beta / (2 * (1 - beta) * beta)  # ᾱ_0 = α_0 = 1 − β_0
    torch.testing.assert_close(model.nll(x, seeds), expected)


def test_ddpm_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="timesteps must be below"):
        tiny_ddpm(DDPMConfig(timesteps=(1000,)))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **_tiny_unet_blocks())
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon'"):
        DDPM(unet, diffusers.DDPMScheduler(prediction_type="v_prediction"))


def _tiny_unet_blocks() -> dict:
    return {
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        "layers_per_block": 1,
    }


def test_a_folder_written_by_diffusers_save_pretrained_loads_and_scores(tmp_path):
    torch.manual_seed(3)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **_tiny_unet_blocks())
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    pipeline.save_pretrained(tmp_path)  # diffusers' own writer, no fimood.json
    model = load_model(str(tmp_path))
    sha256 = model.checkpoint_sha256
    assert isinstance(model, DDPM) and model.config == DDPMConfig() and model.image_shape == (1, 8, 8)
    x, seeds = torch.rand(3, 1, 8, 8), torch.arange(3)
    expected = DDPM(unet, pipeline.scheduler).nll(x, seeds)
    torch.testing.assert_close(model.nll(x, seeds), expected)
    features = grad_norms(model, x, seeds, "auto").sq_norms
    assert features.shape == (3, sum(p.requires_grad for p in model.parameters())) and (features > 0).all()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        (tmp_path / "scheduler" / "scheduler_config.json").read_text().replace('"beta_end": 0.02', '"beta_end": 0.03')
    )
    changed = load_model(str(tmp_path))
    changed_sha256 = changed.checkpoint_sha256
    assert changed_sha256 != sha256  # a detector fitted on the first refuses the second
    assert not torch.equal(changed.betas, model.betas)


def test_a_ddpm_checkpoint_round_trips_with_its_scoring_settings_over_any_fsspec_url():
    model = tiny_ddpm(DDPMConfig(timesteps=(0, 3), n_draws=2))
    sha256 = save_model(model, "memory://ckpt/ddpm")
    loaded = load_model("memory://ckpt/ddpm")
    loaded_sha256 = loaded.checkpoint_sha256
    assert loaded_sha256 == sha256 and loaded.config == model.config
    x, seeds = torch.rand(2, 1, 8, 8), torch.arange(2)
    torch.testing.assert_close(loaded.nll(x, seeds), model.float().nll(x, seeds))


def test_vae_checkpoint_round_trips(tmp_path):
    model = tiny_vae().float()
    sha256 = save_model(model, str(tmp_path))
    loaded = load_model(str(tmp_path))
    loaded_sha256 = loaded.checkpoint_sha256
    assert loaded_sha256 == sha256 and isinstance(loaded, VAE)
    x, seeds = torch.rand(2, 1, 8, 8), torch.arange(2)
    torch.testing.assert_close(loaded.nll(x, seeds), model.nll(x, seeds))


def test_the_discretised_logistic_gives_the_256_levels_probabilities_that_sum_to_one():
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    for mean, log_scale in [(0.1, -2.0), (-0.9, -4.0), (0.99, -6.5), (0.0, 1.0)]:
        log_p = discretized_logistic_log_prob(
            levels, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64), 8
        )
        # bins whose mass underflows use the density at their centre, hence 1e-5 and not exactly 1
        assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-5)


def test_vae_nll_is_the_negative_elbo_in_bits_per_dimension():
    model = tiny_vae()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    deterministic = model.nll(x)  # without seeds, z is the posterior mean
    assert deterministic.shape == (2,) and (deterministic > 0).all()
    samples = torch.stack([model.nll(x, torch.tensor([s, s + 1])) for s in range(64)])
    assert samples.std(0).min() > 0  # the latent sample follows the seed


def test_a_missing_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'fimood\[diffusion\]'"):
        DDPM.from_preset("tiny")


def test_ddpm_training_draws_a_timestep_per_row_from_its_seed():
    model = tiny_ddpm()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64).repeat(64, 1, 1, 1)
    losses = model.training_loss(x, torch.arange(64)).detach().numpy()
    assert len(np.unique(losses.round(12))) > 32
    torch.testing.assert_close(model.training_loss(x[:3], torch.arange(3)), model.training_loss(x[:3], torch.arange(3)))
