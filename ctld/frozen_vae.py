"""The diffusion stage's frozen VAE: loaded from a VAE export and checked against the run's data settings. The
trainer and `ctld-shards encode` (latent shards) load it the same way, so both encode patches alike."""

from __future__ import annotations

import torch

from ctld.config import DataConfig
from ctld.export import load_export
from ctld.models.vae import AutoencoderKL3D


def load_frozen_vae(vae_export: str, data_cfg: DataConfig, device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> AutoencoderKL3D:
    """The export's VAE in eval mode without gradients, in `dtype` on `device`; ValueError when its intensity
    window differs from data.hu_min/hu_max or data.patch_size is not a multiple of its in-plane factor."""
    # Loaded on the CPU, then moved: safetensors rejects device strings like "cpu:0" (accelerate's MULTI_CPU).
    export = load_export(vae_export, "cpu", min_version=1)  # VAE weights of every export format load
    meta = export.meta
    for key in ("hu_min", "hu_max"):
        if float(meta[key]) != float(getattr(data_cfg, key)):
            raise ValueError(
                f"the VAE in {vae_export} was trained with {key}={meta[key]} but data.{key}="
                f"{getattr(data_cfg, key)}; use the VAE run's intensity window (--data.{key}={meta[key]})"
            )
    vae = export.vae
    if data_cfg.patch_size % vae.inplane_factor:
        raise ValueError(f"data.patch_size={data_cfg.patch_size} must be a multiple of the VAE's in-plane factor "
                         f"{vae.inplane_factor}")
    vae.requires_grad_(False)
    return vae.to(device=device, dtype=dtype).eval()
