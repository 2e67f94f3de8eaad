"""Numbers measured once from the data at a stage's start or end, the same on every rank: the slab filter, the
residual scale of the diffusion target and the VAE's latent scaling factor.
"""

from __future__ import annotations

import itertools
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ctld.baselines import SlabFilter, fit_slab_filter
from ctld.config import Config
from ctld.data.latent_shards import latent_shard_urls
from ctld.data.loader import make_patch_loader
from ctld.data.shards import iter_covered_pairs, shard_urls
from ctld.diffusion import ResidualSpec, encode_pair
from ctld.distributed import std_over_ranks
from ctld.validation import VAL_SEED

logger = get_logger(__name__)


def fit_slab_filter_on_shards(cfg: Config) -> SlabFilter:
    """The slab-aware linear baseline (ctld.baselines.SlabFilter), fitted in closed form on the first
    `diffusion.slab_fit_volumes` training volumes; every rank fits the same filter from the same shards."""
    urls = shard_urls(cfg.data, "train")
    start = time.perf_counter()
    limit = cfg.diffusion.slab_fit_volumes
    pairs = ((thick, thin) for _, thick, thin in iter_covered_pairs(urls, cfg.data.factor, limit))
    slab_filter = fit_slab_filter(pairs, cfg.data.factor, taps=cfg.diffusion.slab_taps)
    logger.info(f"slab filter fitted on up to {cfg.diffusion.slab_fit_volumes} training volumes in "
                f"{time.perf_counter() - start:.1f} s; taps per phase: {slab_filter.weights.round(3).tolist()}")
    return slab_filter


@torch.no_grad()
def estimate_residual_scale(accelerator: Accelerator, vae, spec: ResidualSpec, cfg: Config) -> float:
    """1 / std of z_thin - z_prior over `train.scale_batches` batches per rank of a fixed-seed training stream,
    so the diffusion sees a unit-variance residual (as the VAE's scaling_factor does for latents)."""
    latent = bool(cfg.data.latent_shards_dir)
    urls = latent_shard_urls(cfg.data.latent_shards_dir) if latent else shard_urls(cfg.data, "train")
    loader = make_patch_loader(urls, cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes,
                               seed=VAL_SEED + cfg.train.seed, resampled=True, num_workers=0, epoch=0, latent=latent)
    device = accelerator.device
    batches = itertools.islice(loader, max(1, cfg.train.scale_batches))
    if latent:
        residuals = (b["z_thin"].to(device) - b["z_prior"].to(device) for b in batches)
    else:
        residuals = (encode_pair(vae, spec, b["thick"].to(device), b["thin"].to(device)) for b in batches)
        residuals = (target - prior for target, prior in residuals)
    std, _ = std_over_ranks(accelerator, residuals)
    logger.info(f"residual latent std {std:.4g} around the {spec.prior} prior: residual_scale = {1 / std:.4g}")
    return 1.0 / std


@torch.no_grad()
def estimate_scaling_factor(accelerator, vae, train_stream, cfg: Config, step: int) -> float:
    """1 / std of the thin-patch latents over `train.scale_batches` batches per rank (unit-variance latents,
    as Stable Diffusion's 0.18215 was chosen)."""
    vae.eval()
    base = accelerator.unwrap_model(vae)
    dtype = next(base.parameters()).dtype
    latents = (base.encode(train_stream.next(step)["thin"].to(accelerator.device).to(dtype)).sample()
               for _ in range(cfg.train.scale_batches))
    std, count = std_over_ranks(accelerator, latents)
    logger.info(f"latent std {std:.4g} over {count} values: VAE scaling_factor = {1.0 / std:.4g}")
    return 1.0 / std
