"""Validation for both training stages: fixed patches, metrics on HU in named windows, one image panel.

    validate(accelerator, cfg, model=model, frozen_vae=vae, sampler=sampler, spec=spec, ema=ema, val_urls=urls,
             step=step, model_dtype=dtype, log_metrics=True, log_images=True)    # from the training loop

Metrics follow ctld.metrics' protocol (HU mapped to [0, 1] in `WINDOWS[...]`, PSNR over the patch, SSIM per
axial slice), so a validation PSNR here and a `ctld-eval` PSNR mean the same thing. Each function returns
rank-local means over equal numbers of samples; the trainer averages them over ranks with
`accelerator.reduce(..., reduction="mean")`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ctld.baselines import interpolate_z
from ctld.config import Config
from ctld.data.loader import make_patch_loader
from ctld.data.transforms import model_to_hu
from ctld.diffusion import decode_latents, regress, sample
from ctld.distributed import zero_stage
from ctld.metrics import WINDOWS, psnr, ssim2d_mean
from ctld.panels import render_panel

VAL_SEED = 1_000_003  # validation patches and sampling noise: fixed, so validations differ only by the weights


def _add_metrics(sums: dict[str, list[float]], prefix: str, pred_hu: torch.Tensor, target_hu: torch.Tensor) -> None:
    """Per-sample PSNR/SSIM in every named window, appended to `sums[f"{prefix}psnr_{window}"]`."""
    pred = pred_hu.detach().float().cpu().numpy()  # (B, 1, D, H, W)
    target = target_hu.detach().float().cpu().numpy()
    for i in range(pred.shape[0]):
        for name, window in WINDOWS.items():
            sums[f"{prefix}psnr_{name}"].append(psnr(pred[i, 0], target[i, 0], window))
            sums[f"{prefix}ssim_{name}"].append(ssim2d_mean(pred[i, 0], target[i, 0], window))


def _means(sums: dict[str, list[float]]) -> dict[str, float]:
    return {key: float(np.mean(values)) for key, values in sums.items()}


@torch.no_grad()
def validate_vae(
    vae: torch.nn.Module,
    batches: Iterable[dict],
    *,
    hu_min: float,
    hu_max: float,
    factor: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Reconstruction quality of thin and thick patches (posterior mode, no sampling noise).

    Args:
        vae: the (prepared) AutoencoderKL3D, called as `vae(x, sample_posterior=False)`.
        batches: loader batches {"thick": (B, 1, Dk, P, P), "thin": (B, 1, Dk*factor, P, P)} in [-1, 1].
        hu_min, hu_max: the intensity mapping of the data (cfg.data).
        factor: thin slices per thick slice (panel layout only).
        device, dtype: where and in which dtype the model runs (DeepSpeed bf16 needs bf16 inputs).

    Returns:
        ({"thin_psnr_soft_tissue": ..., "thick_ssim_wide": ..., ...}, panel columns for the first sample:
        [thick, thick reconstruction, thin, thin reconstruction] as HU arrays).
    """
    sums: dict[str, list[float]] = defaultdict(list)
    columns: list[np.ndarray] = []
    for batch in batches:
        recons = {}
        for kind in ("thin", "thick"):
            x = batch[kind].to(device, non_blocking=True)
            recon, _ = vae(x.to(dtype), sample_posterior=False)
            recons[kind] = model_to_hu(recon.float(), hu_min, hu_max)
            _add_metrics(sums, f"{kind}_", recons[kind], model_to_hu(x, hu_min, hu_max))
        if not columns:
            columns = [
                model_to_hu(batch["thick"][0, 0], hu_min, hu_max).numpy(),
                recons["thick"][0, 0].cpu().numpy(),
                model_to_hu(batch["thin"][0, 0], hu_min, hu_max).numpy(),
                recons["thin"][0, 0].cpu().numpy(),
            ]
    return _means(sums), columns


@torch.no_grad()
def validate_diffusion(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    sampler,
    spec,
    batches: Iterable[dict],
    *,
    hu_min: float,
    hu_max: float,
    num_inference_steps: int,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Regression output and one diffusion sample from thick patches, scored next to nearest, linear and cubic
    interpolation and the slab filter of the same thick patch (the baselines ctld-eval reports).

    Args:
        unet: the (prepared) U-Net, holding the weights to judge (the trainer swaps in the EMA weights).
        vae: the frozen VAE (eval, on `device`, in its own dtype).
        sampler: a diffusers scheduler from `ctld.diffusion.build_sampler`.
        spec: the `ctld.diffusion.ResidualSpec` (prior, slab filter, residual scale, strength).
        batches: loader batches {"thick": (B, 1, Dk, P, P), "thin": (B, 1, Dk*factor, P, P)} in [-1, 1].
        hu_min, hu_max: the intensity mapping of the data.
        num_inference_steps: sampler steps of the diffusion sample.
        seed: seeds the sampling noise, so successive validations differ only by the weights.
        device: where the models run.

    Returns:
        ({"regression_psnr_soft_tissue": ..., "diffusion_...", "nearest_...", "linear_...", "cubic_...",
        "slab_...": ...}, panel columns for the
        first sample: [thick, regression, diffusion, cubic, target] as HU arrays).
    """
    vae_dtype = next(vae.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    sums: dict[str, list[float]] = defaultdict(list)
    columns: list[np.ndarray] = []
    for batch in batches:
        thick = batch["thick"].to(device, non_blocking=True)
        thin = batch["thin"].to(device, non_blocking=True)
        prior = spec.prior_latents(vae, thick.to(vae_dtype))
        outputs = {
            "regression": regress(unet, prior, residual_scale=spec.residual_scale,
                                  num_train_timesteps=spec.num_train_timesteps),
            "diffusion": sample(unet, sampler, prior, residual_scale=spec.residual_scale, strength=spec.strength,
                                num_inference_steps=num_inference_steps, generator=generator),
        }
        decoded = {name: model_to_hu(decode_latents(vae, latents.to(vae_dtype)).float(), hu_min, hu_max)
                   for name, latents in outputs.items()}
        thick_hu = model_to_hu(thick, hu_min, hu_max)
        for method in ("nearest", "linear", "cubic"):  # same slice geometry as ctld-eval
            decoded[method] = interpolate_z(thick_hu, spec.factor, method)
        if spec.slab_filter is not None:
            decoded["slab"] = spec.slab_filter.apply(thick_hu)
        target_hu = model_to_hu(thin, hu_min, hu_max)
        for name, pred in decoded.items():
            _add_metrics(sums, f"{name}_", pred, target_hu)
        if not columns:
            columns = [t[0, 0].cpu().numpy() for t in (thick_hu, decoded["regression"], decoded["diffusion"],
                                                        decoded["cubic"], target_hu)]
    return _means(sums), columns


def val_batches(urls: list[str], cfg: Config, accelerator: Accelerator) -> list[dict]:
    """`train.val_batches` batches per rank, the same ones at every validation (fixed seed, resampled so
    every rank gets the same number even with fewer val shards than ranks)."""
    loader = make_patch_loader(urls, cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes,
                               seed=VAL_SEED + cfg.data.seed, resampled=True, num_workers=0, epoch=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == cfg.train.val_batches:
            break
    return batches


def validate(accelerator: Accelerator, cfg: Config, *, model, frozen_vae, sampler, spec, ema, val_urls: list[str],
              step: int, model_dtype: torch.dtype, log_metrics: bool, log_images: bool) -> dict[str, float]:
    """Metrics (`val/...`) and/or image panels (`panels/...`) on the fixed validation patches; every rank runs
    its share (a collective under ZeRO-3), rank 0 writes the images. Returns the metrics averaged over ranks
    (on every rank)."""
    model.eval()
    # Fork the RNG so validation (and its loader) leaves the training stream's random state untouched.
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        batches = val_batches(val_urls, cfg, accelerator)
        if cfg.train.stage == "vae":
            metrics, columns = validate_vae(model, batches, hu_min=cfg.data.hu_min, hu_max=cfg.data.hu_max,
                                            factor=cfg.data.factor, device=accelerator.device, dtype=model_dtype)
            labels = ["thick", "thick recon", "thin", "thin recon"]
        else:
            with ema_weights(accelerator, model, ema):
                metrics, columns = validate_diffusion(
                    model, frozen_vae, sampler, spec, batches, hu_min=cfg.data.hu_min, hu_max=cfg.data.hu_max,
                    num_inference_steps=cfg.diffusion.num_inference_steps,
                    seed=VAL_SEED + accelerator.process_index, device=accelerator.device)
            labels = ["thick", "regression (EMA)", "diffusion (EMA)", "cubic", "target"]
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device), "mean")
    reduced = {n: float(v) for n, v in zip(names, values.tolist(), strict=True)}
    if log_metrics:
        accelerator.log({f"val/{n}": v for n, v in reduced.items()}, step=step)
    if log_images and accelerator.is_main_process:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        # Thick columns repeated onto the thin grid; patches carry no spacing, so voxels are drawn square.
        thin_depth = max(len(c) for c in columns)
        named = [(label, np.repeat(c, thin_depth // len(c), axis=0)) for label, c in zip(labels, columns, strict=True)]
        for window_name in ("soft_tissue", "wide"):
            panel = render_panel(named, spacing_mm=(1.0, 1.0, 1.0), views=("axial", "coronal"),
                                 windows=(window_name,), tile=columns[0].shape[-1])
            writer.add_image(f"panels/{window_name}", panel, global_step=step, dataformats="HWC")
    return reduced


# validate()'s metric prefixes -> the row names ctld-eval reports, so a model card shows both alike.
ROW_NAMES = {"nearest": "nearest", "linear": "linear", "cubic": "cubic", "slab": "slab_filter",
             "regression": "ctld_regression", "diffusion": "ctld_diffusion", "thin": "vae_thin", "thick": "vae_thick"}


def score_rows(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"cubic_psnr_wide": 30.1, ...} -> {"cubic": {"psnr_wide": 30.1, ...}, ...}, baselines first."""
    rows: dict[str, dict[str, float]] = {}
    for prefix, row in ROW_NAMES.items():
        values = {key.removeprefix(f"{prefix}_"): value for key, value in sorted(metrics.items())
                  if key.startswith(f"{prefix}_")}
        if values:
            rows[row] = values
    return rows


@contextlib.contextmanager
def ema_weights(accelerator: Accelerator, model, ema: EMAModel):
    """Swap the EMA weights into the prepared U-Net for validation, then put the trained weights back."""
    params = list(accelerator.unwrap_model(model).parameters())
    zero3 = zero_stage(accelerator) == 3
    if zero3:  # partitioned parameters: gather, let rank 0 write, re-partition on exit
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        gather = contextlib.nullcontext()
    with gather:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else contextlib.nullcontext()
        with gather:
            ema.restore(params)
