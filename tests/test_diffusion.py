"""Diffusion loss and sampling around diffusers schedulers, on 5D latents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctld.config import DiffusionConfig
from ctld.diffusion import (
    build_sampler,
    build_train_scheduler,
    decode_latents,
    diffusion_loss,
    encode_latents,
    sample,
)
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D

TINY_UNET = dict(channels=(8, 16), num_res_blocks=1, depth_downsample=(True,), attention_levels=(False, True),
                 norm_num_groups=4, attention_head_dim=8)
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def _unet(factor: int = 3) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(latent_channels=2, factor=factor, **TINY_UNET)


def _scheduler(prediction_type: str, **kwargs):
    return build_train_scheduler(dataclasses.replace(DiffusionConfig(), prediction_type=prediction_type, **kwargs))


def _batch(b: int = 2, d_thick: int = 2, factor: int = 3, h: int = 4, w: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, d_thick * factor, h, w, generator=g), torch.randn(b, 2, d_thick, h, w, generator=g)


def test_train_scheduler_follows_config(tiny_cfg):
    scheduler = build_train_scheduler(tiny_cfg.diffusion)
    assert scheduler.config.prediction_type == tiny_cfg.diffusion.prediction_type
    assert scheduler.config.num_train_timesteps == tiny_cfg.diffusion.num_train_timesteps
    assert scheduler.config.clip_sample is False  # latents are unbounded
    for name in ("ddim", "dpm", "ddpm"):
        sampler = build_sampler(name, scheduler.config)
        assert sampler.config.prediction_type == scheduler.config.prediction_type
        assert sampler.config.beta_schedule == scheduler.config.beta_schedule


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"rescale_betas_zero_snr": True, "prediction_type": "epsilon"}, "rescale_betas_zero_snr"),
    ],
)
def test_bad_diffusion_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        build_train_scheduler(dataclasses.replace(DiffusionConfig(), **changes))


def test_unknown_sampler_and_prediction_type_raise():
    scheduler = _scheduler("epsilon")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        build_sampler("euler", scheduler.config)
    scheduler.register_to_config(prediction_type="flow_prediction")
    latents, cond = _batch()
    with pytest.raises(ValueError, match="unknown prediction_type 'flow_prediction'"):
        diffusion_loss(_unet(), scheduler, latents, cond)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_loss_is_finite_seeded_and_trains(prediction_type, min_snr_gamma):
    unet, scheduler = _unet(), _scheduler(prediction_type)
    latents, cond = _batch()
    losses = [
        diffusion_loss(unet, scheduler, latents, cond, min_snr_gamma=min_snr_gamma,
                       generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert losses[0].ndim == 0 and torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1])  # same generator -> same timesteps and noise
    losses[0].backward()
    assert all(p.grad is not None for p in unet.parameters())


def test_loss_target_matches_prediction_type():
    """A model that returns exactly the target of its prediction type has zero loss."""
    latents, cond = _batch()

    class Oracle(torch.nn.Module):
        factor = 3

        def __init__(self, scheduler, prediction_type):
            super().__init__()
            self.scheduler, self.prediction_type = scheduler, prediction_type

        def forward(self, noisy_latents, timesteps, cond_latents):
            # Recover the noise from x_t = sqrt(a) x0 + sqrt(1 - a) eps through add_noise itself (linear in eps).
            zeros = torch.zeros_like(latents)
            x0_part = self.scheduler.add_noise(latents, zeros, timesteps)
            unit = self.scheduler.add_noise(zeros, torch.ones_like(latents), timesteps)  # sqrt(1 - a)
            noise = (noisy_latents - x0_part) / unit
            if self.prediction_type == "epsilon":
                return noise
            if self.prediction_type == "v_prediction":
                return self.scheduler.get_velocity(latents, noise, timesteps)
            return latents

    for prediction_type in PREDICTION_TYPES:
        scheduler = _scheduler(prediction_type)
        loss = diffusion_loss(Oracle(scheduler, prediction_type), scheduler, latents, cond, min_snr_gamma=5.0,
                              generator=torch.Generator().manual_seed(0))
        assert loss.item() < 1e-8, (prediction_type, loss.item())


def test_min_snr_weights():
    unet, latents, cond = _unet(), *_batch()

    def loss(prediction_type, gamma):
        return diffusion_loss(unet, _scheduler(prediction_type), latents, cond, min_snr_gamma=gamma,
                              generator=torch.Generator().manual_seed(3))

    # epsilon: weight min(snr, gamma) / snr is 1 when gamma exceeds every SNR.
    torch.testing.assert_close(loss("epsilon", 1e9), loss("epsilon", None))
    # v-prediction: weight min(snr, gamma) / (snr + 1) < 1, so the weighted loss is smaller.
    assert loss("v_prediction", 5.0) < loss("v_prediction", None)
    # x0 (sample): weight min(snr, gamma) differs from 1.
    assert not torch.allclose(loss("sample", 5.0), loss("sample", None))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        loss("epsilon", 0.0)


def test_zero_terminal_snr_loss_is_finite():
    scheduler = _scheduler("v_prediction", rescale_betas_zero_snr=True)
    latents, cond = _batch(b=8)
    loss = diffusion_loss(_unet(), scheduler, latents, cond, min_snr_gamma=5.0,
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("sampler_name", ["ddim", "dpm", "ddpm"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sample_shape_and_seed(sampler_name, prediction_type):
    unet = _unet(factor=3).eval()
    sampler = build_sampler(sampler_name, _scheduler(prediction_type).config)
    _, cond = _batch(d_thick=2, h=3, w=5)

    def run(seed):
        return sample(unet, sampler, cond, num_inference_steps=3, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == (2, 2, 6, 3, 5)
    assert torch.isfinite(first).all()
    assert torch.equal(first, run(0))  # reproducible, the DDPM noise included
    assert not torch.allclose(first, run(1))


def test_sample_checks_thin_depth():
    unet = _unet(factor=3).eval()
    sampler = build_sampler("ddim", _scheduler("v_prediction").config)
    _, cond = _batch()
    assert sample(unet, sampler, cond, num_inference_steps=2, thin_depth=6).shape[2] == 6
    with pytest.raises(ValueError, match="thin_depth=5"):
        sample(unet, sampler, cond, num_inference_steps=2, thin_depth=5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(unet, sampler, cond, num_inference_steps=0)


def test_latent_helpers_apply_the_scaling_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=2, norm_num_groups=4, scaling_factor=0.5).eval()
    x = torch.rand(1, 1, 2, 8, 8) * 2 - 1
    latents = encode_latents(vae, x)
    torch.testing.assert_close(latents, vae.encode(x).mode() * 0.5)
    torch.testing.assert_close(decode_latents(vae, latents), vae.decode(latents / 0.5))
