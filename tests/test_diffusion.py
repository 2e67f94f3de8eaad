"""The residual model: its objective, regression and sampling around diffusers schedulers, on 5D latents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctld.baselines import SlabFilter, interpolate_z
from ctld.config import DiffusionConfig
from ctld.diffusion import (
    ResidualSpec,
    build_sampler,
    build_train_scheduler,
    decode_latents,
    encode_latents,
    prior_latents,
    regress,
    residual_loss,
    sample,
    sampling_timesteps,
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
    """(target latents, prior latents), both on the thin grid."""
    g = torch.Generator().manual_seed(1)
    shape = (b, 2, d_thick * factor, h, w)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _loss(unet, scheduler, target, prior, **kwargs):
    kwargs = {"residual_scale": 2.0, "strength": 0.5, "regression_fraction": 0.5, **kwargs}
    return residual_loss(unet, scheduler, target, prior, **kwargs)


def _trained_unet(factor: int = 3) -> UNet3D:
    """A U-Net whose output layer is no longer zero, so its residual is not."""
    unet = _unet(factor)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    return unet.eval()


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
    with pytest.raises(ValueError, match="unknown prediction_type 'flow_prediction'"):
        _loss(_unet(), scheduler, *_batch())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_loss_is_finite_seeded_and_trains(prediction_type, min_snr_gamma):
    unet, scheduler = _unet(), _scheduler(prediction_type)
    target, prior = _batch()
    losses = [_loss(unet, scheduler, target, prior, min_snr_gamma=min_snr_gamma,
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert losses[0].ndim == 0 and torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1])  # same generator -> same split, timesteps and noise
    losses[0].backward()
    # The output layer starts at zero, so only it gets a gradient on the first step; it does get one.
    assert unet.conv_out.weight.grad is not None and unet.conv_out.weight.grad.abs().sum() > 0


def test_untrained_unet_returns_its_prior():
    """The zero-initialised output layer: regression and every sampler give back the prior exactly."""
    unet = _unet().eval()
    _, prior = _batch()
    torch.testing.assert_close(regress(unet, prior, residual_scale=3.0, num_train_timesteps=1000), prior)
    for name in ("ddim", "dpm", "ddpm"):
        sampler = build_sampler(name, _scheduler("sample").config)
        out = sample(unet, sampler, prior, residual_scale=3.0, strength=0.5, num_inference_steps=3,
                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, prior, atol=1e-5, rtol=0)


class _Oracle(torch.nn.Module):
    """Returns exactly the target of its prediction type for the residual `r0`."""

    factor = 3

    def __init__(self, scheduler, r0):
        super().__init__()
        self.scheduler, self.r0 = scheduler, r0
        self.seen_timesteps = []

    def forward(self, noisy, timesteps, prior):
        self.seen_timesteps.append(timesteps.clone())
        num_train = self.scheduler.config.num_train_timesteps
        regression = (timesteps == num_train).view(-1, 1, 1, 1, 1)
        t = torch.where(timesteps == num_train, torch.zeros_like(timesteps), timesteps)
        zeros = torch.zeros_like(self.r0)
        x0_part = self.scheduler.add_noise(self.r0, zeros, t)
        unit = self.scheduler.add_noise(zeros, torch.ones_like(self.r0), t)  # sqrt(1 - a)
        noise = (noisy - x0_part) / unit
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            out = noise
        elif prediction_type == "v_prediction":
            out = self.scheduler.get_velocity(self.r0, noise, t)
        else:
            out = self.r0
        return torch.where(regression, self.r0, out)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_targets_the_scaled_residual(prediction_type):
    """A model that predicts the true scaled residual (its prediction type's target) has zero loss, for the
    regression and the diffusion samples alike."""
    target, prior = _batch(b=6)
    scheduler = _scheduler(prediction_type)
    oracle = _Oracle(scheduler, (target - prior) * 2.0)
    loss = _loss(oracle, scheduler, target, prior, residual_scale=2.0, min_snr_gamma=5.0,
                 generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8, loss.item()


def test_loss_trains_the_timesteps_the_sampler_uses():
    """Diffusion timesteps are drawn below strength * T (where sampling starts); regression samples carry T."""
    target, prior = _batch(b=64)
    scheduler = _scheduler("sample")
    oracle = _Oracle(scheduler, (target - prior) * 2.0)
    _loss(oracle, scheduler, target, prior, strength=0.3, regression_fraction=0.25,
          generator=torch.Generator().manual_seed(0))
    t = oracle.seen_timesteps[0]
    regression = t == 1000
    assert 8 <= int(regression.sum()) <= 24  # about a quarter of 64
    assert int(t[~regression].max()) < 300 and int(t[~regression].min()) >= 0
    sampled = sampling_timesteps(build_sampler("ddim", scheduler.config), strength=0.3, num_inference_steps=4)
    assert len(sampled) == 4 and int(sampled.max()) < 300
    with pytest.raises(ValueError, match="strength"):
        _loss(oracle, scheduler, target, prior, strength=0.0)


def test_regression_is_one_pass_at_the_extra_timestep():
    target, prior = _batch()
    oracle = _Oracle(_scheduler("v_prediction"), (target - prior) * 4.0)
    torch.testing.assert_close(regress(oracle, prior, residual_scale=4.0, num_train_timesteps=1000), target)
    assert len(oracle.seen_timesteps) == 1 and bool((oracle.seen_timesteps[0] == 1000).all())


@pytest.mark.parametrize("sampler_name", ["ddim", "dpm", "ddpm"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sample_shape_and_seed(sampler_name, prediction_type):
    unet = _trained_unet(factor=3)
    sampler = build_sampler(sampler_name, _scheduler(prediction_type).config)
    _, prior = _batch(d_thick=2, h=3, w=5)

    def run(seed):
        return sample(unet, sampler, prior, residual_scale=2.0, strength=0.5, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == (2, 2, 6, 3, 5)
    assert torch.isfinite(first).all()
    assert torch.equal(first, run(0))  # reproducible, the DDPM noise included
    assert not torch.allclose(first, run(1))


def test_sample_of_the_oracle_is_the_target():
    """Sampling from the noised prior with a perfect x0-model lands on the target: the chain is consistent."""
    target, prior = _batch()
    scheduler = _scheduler("sample")
    oracle = _Oracle(scheduler, (target - prior) * 2.0)
    out = sample(oracle, build_sampler("ddim", scheduler.config), prior, residual_scale=2.0, strength=0.6,
                 num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    # First the one-pass estimate the chain starts from, then the sampler's steps below strength * T.
    assert int(oracle.seen_timesteps[0][0]) == 1000 and int(oracle.seen_timesteps[1][0]) < 600


def test_unet_rejects_a_depth_that_is_not_whole_slabs():
    unet = _unet(factor=3)
    x = torch.zeros(1, 2, 5, 4, 4)
    with pytest.raises(ValueError, match="multiple of factor 3"):
        unet(x, torch.tensor([1]), x)
    with pytest.raises(ValueError, match="prior_latents"):
        unet(torch.zeros(1, 2, 6, 4, 4), torch.tensor([1]), x)


def test_priors_and_spec_round_trip():
    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=2, norm_num_groups=4, scaling_factor=0.5).eval()
    thick = torch.rand(1, 1, 3, 8, 8) * 2 - 1
    slab = SlabFilter(torch.tensor([[0.2, 0.6, 0.2]] * 3, dtype=torch.float64).numpy())
    cubic = prior_latents(vae, thick, prior="encode_cubic", factor=3)
    torch.testing.assert_close(cubic, encode_latents(vae, interpolate_z(thick, 3, "cubic")))
    slabbed = prior_latents(vae, thick, prior="encode_slab", factor=3, slab_filter=slab)
    torch.testing.assert_close(slabbed, encode_latents(vae, slab.apply(thick)))
    latent = prior_latents(vae, thick, prior="latent_cubic", factor=3)
    torch.testing.assert_close(latent, interpolate_z(encode_latents(vae, thick), 3, "cubic"))
    with pytest.raises(ValueError, match="slab filter"):
        prior_latents(vae, thick, prior="encode_slab", factor=3)
    spec = ResidualSpec(prior="encode_slab", factor=3, residual_scale=4.5, strength=0.4, num_train_timesteps=1000,
                        slab_filter=slab)
    again = ResidualSpec.from_meta({"factor": 3, **spec.to_meta()})
    assert again.residual_scale == 4.5 and again.strength == 0.4 and again.prior == "encode_slab"
    torch.testing.assert_close(torch.from_numpy(again.slab_filter.weights), torch.from_numpy(slab.weights))
    with pytest.raises(ValueError, match="retrain"):
        ResidualSpec.from_meta({"factor": 3})


def test_latent_helpers_apply_the_scaling_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=2, norm_num_groups=4, scaling_factor=0.5).eval()
    x = torch.rand(1, 1, 2, 8, 8) * 2 - 1
    latents = encode_latents(vae, x)
    torch.testing.assert_close(latents, vae.encode(x).mode() * 0.5)
    torch.testing.assert_close(decode_latents(vae, latents), vae.decode(latents / 0.5))
