"""Residual latent diffusion anchored on a prior: the thin latent = prior latent + a learned correction.

The prior is a base estimate of the thin latent from the thick input (`diffusion.prior`):
- `encode_slab`: encode the slab filter's thin volume (`ctld.baselines.SlabFilter`, fitted on the training split);
- `encode_cubic`: encode the cubic interpolation of the thick volume;
- `latent_cubic`: encode the thick volume, then cubic interpolation of its latent along depth.
The U-Net sees the prior latent (and the thin-slice phase) and predicts the residual `r0 = (z_thin - z_prior) *
residual_scale` (unit variance over the training data); its output layer starts at zero, so an untrained model
returns the prior exactly. One trained model infers two ways:
- regression: one forward pass with a zero residual input at the extra timestep `num_train_timesteps` (the
  conditional mean: best PSNR, fastest);
- diffusion: diffusers DDIM/DPM-Solver/DDPM over the residual, starting from the prior plus the one-pass residual
  estimate, noised to `strength` of the schedule (SDEdit-style: the chain starts at anchored estimate + noise,
  never from structureless noise), and the mean of `num_samples` samples. Why this and not a ResShift/I2SB
  bridge: it keeps the diffusers schedulers as they are (one schedule for training and sampling, every sampler
  usable), and a bridge's start (the degraded input plus noise) is this start with the residual estimate left at
  zero, which the measurements on the demo showed to leave samples at the prior; the strength is the one knob.
Training mixes both objectives in every batch (`regression_fraction` of the samples) and draws diffusion
timesteps only below `strength`, so the steps the sampler takes are the steps that were trained.

Latents here are diffusion-space latents: the VAE's latents times `vae.scaling_factor`.

    scheduler = build_train_scheduler(cfg.diffusion)
    prior = prior_latents(vae, thick, prior="encode_slab", factor=5, slab_filter=slab)
    loss = residual_loss(unet, scheduler, target, prior, residual_scale=s, strength=0.5, regression_fraction=0.5)
    latents = regress(unet, prior, residual_scale=s, num_train_timesteps=1000)
    latents = sample(unet, build_sampler("ddim", scheduler.config), prior, residual_scale=s, strength=0.5,
                     num_inference_steps=4, generator=g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ctld.baselines import SlabFilter, interpolate_z
from ctld.config import DiffusionConfig

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PRIORS = ("encode_slab", "encode_cubic", "latent_cubic")


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


def check_strength(strength: float) -> None:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"diffusion strength must be in (0, 1], got {strength}")


@dataclass(frozen=True)
class ResidualSpec:
    """What turns a U-Net output into a thin latent; saved in the export's ctld.json (`residual`, `slab_filter`)."""

    prior: str
    factor: int
    residual_scale: float
    strength: float
    num_train_timesteps: int
    slab_filter: SlabFilter | None = None

    def to_meta(self) -> dict[str, Any]:
        doc = {"residual": {"prior": self.prior, "residual_scale": self.residual_scale, "strength": self.strength,
                            "num_train_timesteps": self.num_train_timesteps}}
        if self.slab_filter is not None:
            doc["slab_filter"] = self.slab_filter.to_json()
        return doc

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ResidualSpec:
        if "residual" not in meta:
            raise ValueError("the export has no 'residual' block in ctld.json: it predates the residual model "
                             "(ctld format 2); retrain its diffusion stage with this version of ctld")
        doc = meta["residual"]
        slab = SlabFilter.from_json(meta["slab_filter"]) if "slab_filter" in meta else None
        return cls(prior=str(doc["prior"]), factor=int(meta["factor"]), residual_scale=float(doc["residual_scale"]),
                   strength=float(doc["strength"]), num_train_timesteps=int(doc["num_train_timesteps"]),
                   slab_filter=slab)

    def prior_latents(self, vae, thick: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return prior_latents(vae, thick, prior=self.prior, factor=self.factor, slab_filter=self.slab_filter,
                             pixels=pixels)

    def prior_pixels(self, thick):
        return prior_pixels(thick, prior=self.prior, factor=self.factor, slab_filter=self.slab_filter)


# --------------------------------------------------------------------------------------------------------------
# The prior


def prior_pixels(thick: torch.Tensor, *, prior: str, factor: int, slab_filter: SlabFilter | None):
    """The thin-grid image the prior latent encodes, from thick slices along the third-last axis (model units or
    HU: both linear filters have rows summing to 1); None for `latent_cubic`, which interpolates latents."""
    if prior not in PRIORS:
        raise ValueError(f"unknown diffusion.prior {prior!r}; choose one of {list(PRIORS)}")
    if prior == "encode_slab":
        if slab_filter is None:
            raise ValueError("diffusion.prior=encode_slab needs a fitted slab filter (the export's slab_filter)")
        if slab_filter.factor != factor:
            raise ValueError(f"the slab filter has factor {slab_filter.factor}, the model {factor}")
        return slab_filter.apply(thick)
    if prior == "encode_cubic":
        return interpolate_z(thick, factor, "cubic")
    return None


@torch.no_grad()
def prior_latents(vae, thick: torch.Tensor, *, prior: str, factor: int, slab_filter: SlabFilter | None = None,
                  pixels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, D, H, W) thick in model units -> (B, C, D*factor, h, w) scaled prior latents.

    `pixels` may pass the thin-grid prior image computed elsewhere (the inference engine computes it on the whole
    volume, so window edges see the same taps as the interior)."""
    if prior == "latent_cubic":
        return interpolate_z(encode_latents(vae, thick), factor, "cubic")
    if pixels is None:
        pixels = prior_pixels(thick, prior=prior, factor=factor, slab_filter=slab_filter)
    return encode_latents(vae, pixels)


# --------------------------------------------------------------------------------------------------------------
# Training


def _snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) from the scheduler's own `alphas_cumprod`
    (as diffusers.training_utils.compute_snr)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod).clamp_min(1e-20)


def residual_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    target_latents: torch.Tensor,
    prior: torch.Tensor,
    *,
    residual_scale: float,
    strength: float,
    regression_fraction: float,
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One batch of the combined objective (module docstring).

    Args:
        unet: the UNet3D (or a wrapped/prepared one).
        scheduler: the training DDPMScheduler; its `prediction_type` picks the diffusion target.
        target_latents: (B, C, D_thin, h, w) clean thin latents (posterior mode, scaled).
        prior: (B, C, D_thin, h, w) prior latents, scaled the same way.
        residual_scale: multiplies z_thin - z_prior so the residual has unit variance.
        strength: diffusion timesteps are drawn uniformly from [0, strength * num_train_timesteps).
        regression_fraction: expected share of samples trained as regression (zero input, extra timestep).
        min_snr_gamma: Min-SNR-gamma weighting of the diffusion samples (arXiv:2303.09556); None = each timestep
            weighted as its x0 error under the prediction type (plain MSE).
        generator: seeds the split, timesteps and noise.

    Returns:
        Scalar loss (fp32): the mean over samples of their MSE.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    check_strength(strength)
    if not 0.0 <= regression_fraction <= 1.0:
        raise ValueError(f"regression_fraction must be in [0, 1], got {regression_fraction}")
    residual = (target_latents.float() - prior.float()) * residual_scale
    b, device = residual.shape[0], residual.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    num_train = scheduler.config.num_train_timesteps
    max_t = max(1, int(round(strength * num_train)))
    # How many regression samples: B * fraction, the fractional part drawn, so small batches keep the share.
    draw = torch.rand((), generator=generator, device=gen_device).item()
    n_regression = int(math.floor(b * regression_fraction + draw))
    is_regression = (torch.arange(b, device=device) < n_regression)
    timesteps = torch.randint(0, max_t, (b,), generator=generator, device=gen_device).to(device)
    noise = randn_tensor(residual.shape, generator=generator, device=device, dtype=residual.dtype)
    noisy = scheduler.add_noise(residual, noise, timesteps)
    mask = is_regression.view(b, 1, 1, 1, 1)
    noisy = torch.where(mask, torch.zeros_like(noisy), noisy)
    model_timesteps = torch.where(is_regression, torch.full_like(timesteps, num_train), timesteps)

    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(residual, noise, timesteps)
    else:  # "sample"
        target = residual
    target = torch.where(mask, residual, target)  # regression predicts the residual itself

    model_output = unet(noisy, model_timesteps, prior)
    per_sample = F.mse_loss(model_output.float(), target, reduction="none").mean(dim=(1, 2, 3, 4))  # (B,)
    if min_snr_gamma is not None:
        # Min-SNR-gamma expressed for each target (Hang et al. 2023, eq. 8 and appendix): x0-loss weight
        # min(SNR, gamma); eps-loss = x0-loss / SNR; v-loss = x0-loss / (SNR + 1).
        snr = _snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        if prediction_type == "epsilon":
            weight = clipped / snr.clamp_min(1e-8)
        elif prediction_type == "v_prediction":
            weight = clipped / (snr + 1.0)
        else:
            weight = clipped
        per_sample = torch.where(is_regression, per_sample, per_sample * weight)
    return per_sample.mean()


# --------------------------------------------------------------------------------------------------------------
# Inference


@torch.no_grad()
def regress(unet: torch.nn.Module, prior: torch.Tensor, *, residual_scale: float, num_train_timesteps: int
            ) -> torch.Tensor:
    """The conditional mean in one pass: prior + the predicted residual. (B, C, D_thin, h, w) scaled latents."""
    b = prior.shape[0]
    timesteps = torch.full((b,), num_train_timesteps, device=prior.device, dtype=torch.long)
    residual = unet(torch.zeros_like(prior, dtype=torch.float32), timesteps, prior).float()
    return prior.float() + residual / residual_scale


def sampling_timesteps(sampler, *, strength: float, num_inference_steps: int, device=None) -> torch.Tensor:
    """Set the sampler's schedule so that `num_inference_steps` steps lie below `strength` of the training
    timesteps (img2img's recipe: a finer full schedule, keep its tail); returns those timesteps."""
    check_strength(strength)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    num_train = sampler.config.num_train_timesteps
    total = min(num_train, int(math.ceil(num_inference_steps / strength)))
    sampler.set_timesteps(total, device=device)
    timesteps = sampler.timesteps
    start = int(((timesteps >= strength * num_train).sum()).item())
    start = min(start, len(timesteps) - 1)
    if hasattr(sampler, "set_begin_index"):
        sampler.set_begin_index(start)
    return timesteps[start:]


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    sampler,
    prior: torch.Tensor,
    *,
    residual_scale: float,
    strength: float,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One diffusion sample of the thin latent: the residual starts at the one-pass estimate noised to `strength`
    (SDEdit from the anchored estimate) and is denoised by `sampler`. (B, C, D_thin, h, w) scaled latents (fp32)."""
    timesteps = sampling_timesteps(sampler, strength=strength, num_inference_steps=num_inference_steps,
                                   device=prior.device)
    b = prior.shape[0]
    num_train = sampler.config.num_train_timesteps
    # The chain starts from the one-pass estimate of the residual noised to the first timestep, i.e. from a sample
    # of q(x_t0 | r0_hat). Starting from the zero residual instead leaves out sqrt(alpha_bar_t0) * r0 from x_t0,
    # which the model never saw in training (measured on the demo: samples then stayed at the prior, cubic + 0.1 dB).
    estimate = unet(torch.zeros_like(prior, dtype=torch.float32), torch.full((b,), num_train, device=prior.device,
                                                                             dtype=torch.long), prior).float()
    noise = randn_tensor(prior.shape, generator=generator, device=prior.device, dtype=torch.float32)
    residual = sampler.add_noise(estimate, noise, timesteps[:1].expand(b))
    for index, t in enumerate(timesteps):
        model_input = sampler.scale_model_input(residual, t)
        model_output = unet(model_input, t.expand(b), prior).float()
        output = sampler.step(model_output, t, residual, generator=generator)
        residual = output.prev_sample
        if index == len(timesteps) - 1 and getattr(output, "pred_original_sample", None) is not None:
            # DDIM/DDPM: the last step's x0 estimate. With trailing spacing the last step may land on t = 0
            # rather than past it, which would leave sqrt(1 - alpha_bar_0) of noise in prev_sample.
            residual = output.pred_original_sample
    return prior.float() + residual / residual_scale


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, *, generator: torch.Generator | None = None,
                   sample_posterior: bool = False) -> torch.Tensor:
    """(B, 1, D, H, W) images in [-1, 1] -> scaled latents (B, C, D, H/f, W/f), no gradients (frozen VAE)."""
    posterior = vae.encode(x)
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return z * vae.scaling_factor


@torch.no_grad()
def encode_pair(vae, spec: ResidualSpec, thick: torch.Tensor, thin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, prior): the frozen VAE's posterior-mode thin latents and the prior latents of (thick, thin) patches
    in model units, fp32. What the training objective is computed on; `ctld-shards encode` stores exactly these."""
    vae_dtype = next(vae.parameters()).dtype
    target = encode_latents(vae, thin.to(vae_dtype))
    prior = spec.prior_latents(vae, thick.to(vae_dtype))
    return target.float(), prior.float()


def batch_residual_loss(unet, vae, scheduler, spec: ResidualSpec, thick: torch.Tensor, thin: torch.Tensor, *,
                        regression_fraction: float, min_snr_gamma: float | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The training objective on one batch of (thick, thin) patches in model units, on the models' device: the frozen
    VAE's posterior-mode thin latents around the prior latents (`encode_pair`), through `residual_loss`. The trainer
    (on pixel shards) and the adaptation to one series (ctld.adapt) call it."""
    target, prior = encode_pair(vae, spec, thick, thin)
    return spec_residual_loss(unet, scheduler, spec, target, prior, regression_fraction=regression_fraction,
                              min_snr_gamma=min_snr_gamma, generator=generator)


def spec_residual_loss(unet, scheduler, spec: ResidualSpec, target: torch.Tensor, prior: torch.Tensor, *,
                       regression_fraction: float, min_snr_gamma: float | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """`residual_loss` with the residual's scale and strength from `spec`, on encoded latents (from `encode_pair`
    or latent shards)."""
    # The U-Net casts its input to its own weight dtype (DeepSpeed bf16 casts the model).
    return residual_loss(unet, scheduler, target.float(), prior.float(), residual_scale=spec.residual_scale,
                         strength=spec.strength, regression_fraction=regression_fraction, min_snr_gamma=min_snr_gamma,
                         generator=generator)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 1, D, H, W) images (model intensities, about [-1, 1])."""
    return vae.decode(latents / vae.scaling_factor)
