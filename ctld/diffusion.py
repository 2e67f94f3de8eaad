"""Training loss and sampling loop around diffusers schedulers; no schedule maths lives here.

Training uses `DDPMScheduler.add_noise` (and `get_velocity` for v-prediction); sampling uses a DDIM, DPM-Solver++
or DDPM scheduler built from the training scheduler's config, through `set_timesteps` + `step` (the `full_loop`
of diffusers' tests/schedulers/test_scheduler_ddim.py).

Latents here are diffusion-space latents: the VAE's latents times `vae.scaling_factor`
(`encode_latents` / `decode_latents` below do the scaling).

    scheduler = build_train_scheduler(cfg.diffusion)
    loss = diffusion_loss(unet, scheduler, latents, cond_latents, min_snr_gamma=cfg.diffusion.min_snr_gamma)
    sampler = build_sampler("ddim", scheduler.config)
    latents = sample(unet, sampler, cond_latents, num_inference_steps=20, generator=g)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ctld.config import DiffusionConfig

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The DDPM scheduler that defines the forward process for training (and whose config sampling reuses)."""
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}")
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"diffusion.beta_schedule must be one of {BETA_SCHEDULES}, got {cfg.beta_schedule!r}")
    if cfg.num_train_timesteps < 2:
        raise ValueError(f"diffusion.num_train_timesteps must be >= 2, got {cfg.num_train_timesteps}")
    if cfg.rescale_betas_zero_snr and cfg.prediction_type == "epsilon":
        # At zero terminal SNR the noise is the whole input, so epsilon carries no information about x0
        # (Lin et al. 2023, https://arxiv.org/abs/2305.08891, section 3.2).
        raise ValueError("diffusion.rescale_betas_zero_snr needs prediction_type v_prediction or sample, not epsilon")
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        # Latents are not bounded to [-1, 1]: the image-space clipping default would distort them.
        clip_sample=False,
        timestep_spacing=cfg.timestep_spacing,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )


def build_sampler(name: str, scheduler_config: Any):
    """A sampling scheduler ("ddim", "dpm" = DPM-Solver++ multistep, "ddpm") sharing the training schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_config(scheduler_config)


def _snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) from the scheduler's own `alphas_cumprod`
    (as diffusers.training_utils.compute_snr)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod).clamp_min(1e-20)


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    cond_latents: torch.Tensor,
    *,
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising loss for one batch.

    Args:
        unet: the UNet3D (or a wrapped/prepared one).
        scheduler: the training DDPMScheduler; its `prediction_type` picks the target.
        latents: (B, C, D_thin, h, w) clean thin latents, already scaled by `vae.scaling_factor`.
        cond_latents: (B, C, D_thick, h, w) thick latents, scaled the same way.
        min_snr_gamma: Min-SNR-gamma weighting (https://arxiv.org/abs/2303.09556); None = plain MSE.
        generator: seeds the timesteps and the noise.

    Returns:
        Scalar loss (fp32).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    latents = latents.float()
    b = latents.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=gen_device)
    timesteps = timesteps.to(latents.device)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)

    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:  # "sample"
        target = latents

    model_output = unet(noisy_latents, timesteps, cond_latents)
    per_sample = F.mse_loss(model_output.float(), target, reduction="none").mean(dim=(1, 2, 3, 4))  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    # Min-SNR-gamma expressed for each target (Hang et al. 2023, eq. 8 and appendix; diffusers train_text_to_image):
    # x0-loss weight min(SNR, gamma); eps-loss = x0-loss / SNR; v-loss = x0-loss / (SNR + 1).
    snr = _snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if prediction_type == "epsilon":
        weight = clipped / snr.clamp_min(1e-8)
    elif prediction_type == "v_prediction":
        weight = clipped / (snr + 1.0)
    else:
        weight = clipped
    return (per_sample * weight).mean()


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    sampler,
    cond_latents: torch.Tensor,
    *,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    thin_depth: int | None = None,
) -> torch.Tensor:
    """Draw thin latents given thick latents.

    Args:
        unet: the UNet3D; its `factor` sets the thin depth.
        sampler: a scheduler from `build_sampler` (its state is reset by `set_timesteps`).
        cond_latents: (B, C, D_thick, h, w) scaled thick latents.
        num_inference_steps: denoising steps.
        generator: seeds the initial noise and any stochastic steps (DDPM); same seed -> same output.
        thin_depth: optional check: must equal D_thick * factor.

    Returns:
        (B, C, D_thick * factor, h, w) scaled thin latents (fp32).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    factor = getattr(unet, "module", unet).factor  # DDP/accelerate wrappers keep the model in .module
    b, c, d_thick, h, w = cond_latents.shape
    if thin_depth is not None and thin_depth != d_thick * factor:
        raise ValueError(f"thin_depth={thin_depth} must equal D_thick {d_thick} x factor {factor}")
    shape = (b, c, d_thick * factor, h, w)
    latents = randn_tensor(shape, generator=generator, device=cond_latents.device, dtype=torch.float32)
    latents = latents * sampler.init_noise_sigma
    sampler.set_timesteps(num_inference_steps, device=cond_latents.device)
    for t in sampler.timesteps:
        model_input = sampler.scale_model_input(latents, t)
        model_output = unet(model_input, t.expand(b), cond_latents).float()
        latents = sampler.step(model_output, t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, *, generator: torch.Generator | None = None,
                   sample_posterior: bool = False) -> torch.Tensor:
    """(B, 1, D, H, W) images in [-1, 1] -> scaled latents (B, C, D, H/f, W/f), no gradients (frozen VAE)."""
    posterior = vae.encode(x)
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return z * vae.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 1, D, H, W) images (model intensities, about [-1, 1])."""
    return vae.decode(latents / vae.scaling_factor)
