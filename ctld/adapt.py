"""Adaptation to one series: fine-tune a copy of an export's U-Net on in-plane pairs of the very thick series it is
about to interpolate (issue 14, part 2), then interpolate through-plane with the adapted copy.

A thick series is coarse only along its slice axis; its in-plane axes, resampled to the thin spacing and made thick
with the export's slice profile (`ctld.data.inplane`), give thick/thin pairs of this scanner, kernel, noise and
anatomy. The adaptation trains on them with the trainer's objective (`ctld.diffusion.residual_loss` around the
export's prior, frozen VAE posterior mode), for a bounded number of AdamW steps:

    adapted = adapt_export(export, thick_hu, spacing_mm, steps=200, seed=0, device="cuda")
    save_adapted(adapted, "runs/ctld/export_adapted_case7")   # optional; a complete export folder

The base export is never modified: the U-Net is deep-copied, the VAE is shared but only used under no_grad, and
the meta dict is copied (with an `adapted` block added: steps, seed, lr, batch size, pairs, losses; nothing that
identifies the series). Same export, series, seed and settings on the same device -> the same adapted weights.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctld.data.domain import model_pixel_spacing_mm
from ctld.data.inplane import InplanePair, inplane_pairs
from ctld.data.patches import sample_patch_pairs
from ctld.data.transforms import hu_to_model
from ctld.diffusion import ResidualSpec, batch_residual_loss
from ctld.export import Export, save_export
from ctld.predictors import autocast_context

logger = logging.getLogger(__name__)

# Defaults (also InferConfig's adapt_* defaults).
# lr: a tenth of the demo's training peak (2e-3) and twice base.yaml's: large enough that a few hundred steps move a
# trained model, small enough that one series (a few hundred patches' worth of anatomy) does not wash out what the
# model learned from many.
DEFAULT_LR = 2e-4
DEFAULT_BATCH_SIZE = 4
# Regression share of each batch: the one-pass (regression) output is what ctld-infer's default mode returns and what
# PSNR rewards, as in configs/demo.yaml (0.75); the remaining quarter keeps the diffusion timesteps below `strength`
# trained, so `--mode diffusion` stays usable after adaptation.
REGRESSION_FRACTION = 0.75
# Min-SNR weighting stays off (base.yaml's default): only timesteps below `strength` are drawn, where the SNR is
# high and the x0 MSE of the `sample` prediction type is already balanced; the export does not record the gamma
# its run used, so the plain objective is the one that cannot contradict it.
MIN_SNR_GAMMA = None
# Crops mostly inside the body (configs/demo.yaml): a thick series' in-plane pairs carry a lot of air around the
# patient. The best of `max_tries` draws is kept when none reaches it (padded small pairs).
MIN_FOREGROUND_FRACTION = 0.3
MAX_GRAD_NORM = 1.0  # the trainer's train.max_grad_norm
WEIGHT_DECAY = 0.0  # decay pulls towards zero, not towards the trained weights: off for a short fine-tune
LOG_POINTS = 4  # one log line per ~25% of the steps


@dataclass
class Adaptation:
    """What `adapt_unet` returns: the adapted copy (eval mode) and its per-step losses."""

    unet: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)  # per in-plane pair: axis and thick/thin shapes


def check_settings(*, steps: int, lr: float, batch_size: int) -> None:
    if steps < 1:
        raise ValueError(f"adaptation needs steps >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"adaptation lr must be a positive number, got {lr}")
    if batch_size < 1:
        raise ValueError(f"adaptation batch_size must be >= 1, got {batch_size}")


def series_pairs(thick_hu: np.ndarray, spacing_mm, meta: dict) -> list[InplanePair]:
    """The in-plane pairs of a thick series for an export: in-plane pixels first resampled to the spacing the export
    runs the series at (`ctld.data.domain.model_pixel_spacing_mm`, as `interpolate_at_spacing` does at inference), then
    both in-plane axes ("y", "x") resampled to the thin spacing dz / factor and made thick with the export's slice
    profile."""
    from ctld.data.geometry import resample_inplane

    hu = np.asarray(thick_hu)
    if hu.ndim != 3:
        raise ValueError(f"the thick series must be (D, H, W), got shape {hu.shape}")
    spacing = tuple(float(v) for v in spacing_mm)
    model_mm = model_pixel_spacing_mm(meta, spacing[1:])
    if model_mm:
        hu, spacing = resample_inplane(hu, spacing, model_mm)
    factor = int(meta["factor"])
    return inplane_pairs(hu, spacing, factor=factor, profile=str(meta.get("thick_profile", "box")))


def draw_batch(pairs: list[InplanePair], rng: np.random.Generator, *, count: int, factor: int, depth_thick: int,
               patch_size: int, hu_range: tuple[float, float], augment: bool = True,
               min_foreground_fraction: float = MIN_FOREGROUND_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` aligned patches from the pairs (a pair drawn uniformly per patch): thick (B, 1, depth_thick, P, P)
    and thin (B, 1, depth_thick * factor, P, P) in model units. A pair smaller than a patch along an axis (a short
    series: the y-pair's H is the series' slice count) is padded with air, as the trainer's `small_volume: pad`."""
    thick, thin = [], []
    for _ in range(count):
        pair = pairs[int(rng.integers(len(pairs)))]
        drawn = sample_patch_pairs(pair.thick_hu, pair.thin_hu, factor=factor, offset=0, depth_thick=depth_thick,
                                   patch_size=patch_size, count=1, rng=rng, augment=augment,
                                   min_foreground_fraction=min_foreground_fraction, small_volume="pad")
        if drawn is None:  # cannot happen for an in-plane pair (offset 0, >= 1 whole slab), kept for safety
            raise ValueError(f"in-plane pair {pair.axis} {pair.thick_hu.shape} gave no patch")
        thick_patch, thin_patch, _ = drawn[0]
        thick.append(hu_to_model(np.ascontiguousarray(thick_patch), *hu_range))
        thin.append(hu_to_model(np.ascontiguousarray(thin_patch), *hu_range))
    return torch.from_numpy(np.stack(thick)[:, None]), torch.from_numpy(np.stack(thin)[:, None])


def batch_loss(unet, vae, scheduler, spec: ResidualSpec, thick: torch.Tensor, thin: torch.Tensor, *,
               regression_fraction: float = REGRESSION_FRACTION, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The trainer's objective (`ctld.train._unet_loss`) on one batch: posterior-mode thin latents of the frozen
    VAE around the export's prior latents, `residual_loss` with the export's residual scale and strength."""
    device = torch.device(device)
    with autocast_context(device):
        return batch_residual_loss(unet, vae, scheduler, spec, thick.to(device), thin.to(device),
                                   regression_fraction=regression_fraction, min_snr_gamma=MIN_SNR_GAMMA,
                                   generator=generator)


def adapt_unet(export: Export, thick_hu: np.ndarray, spacing_mm, *, steps: int, seed: int = 0, lr: float = DEFAULT_LR,
               batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str = "cpu",
               regression_fraction: float = REGRESSION_FRACTION) -> Adaptation:
    """Fine-tune a deep copy of `export.unet` on in-plane pairs of one thick series (module docstring).

    Args:
        export: a loaded diffusion export (VAE, U-Net, scheduler, meta with `residual`); left untouched.
        thick_hu: the thick series, (D, H, W) HU, as read for interpolation.
        spacing_mm: its (dz, dy, dx).
        steps: AdamW steps (the bound on the cost: each is one training step of `batch_size` patches).
        seed: seeds the patch draws (numpy) and the objective's split, timesteps and noise (torch).
        lr: AdamW learning rate (constant; no warm-up: the model is already trained).
        batch_size: patches per step.
        device: where to train (bf16 autocast on CUDA, fp32 elsewhere).
    """
    if export.unet is None or export.scheduler is None:
        raise ValueError("adaptation needs a diffusion export (VAE + U-Net + scheduler), not a VAE-only export")
    check_settings(steps=steps, lr=lr, batch_size=batch_size)
    device = torch.device(device)
    meta = export.meta
    spec = ResidualSpec.from_meta(meta)
    factor, depth_thick, patch_size = int(meta["factor"]), int(meta["depth_thick"]), int(meta["patch_size"])
    hu_range = (float(meta["hu_min"]), float(meta["hu_max"]))
    pairs = series_pairs(thick_hu, spacing_mm, meta)

    unet = copy.deepcopy(export.unet).to(device).float().train()
    vae = export.vae
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    losses: list[float] = []
    every = max(1, steps // LOG_POINTS)
    start = time.perf_counter()
    logger.info("adapting the U-Net to the series: %d steps of %d patches (%s) from in-plane pairs %s, lr %.3g, "
                "seed %d", steps, batch_size, f"{depth_thick}x{patch_size}x{patch_size}",
                [f"{p.axis}:{tuple(p.thick_hu.shape)}" for p in pairs], lr, seed)
    for step in range(1, steps + 1):
        thick, thin = draw_batch(pairs, rng, count=batch_size, factor=factor, depth_thick=depth_thick,
                                 patch_size=patch_size, hu_range=hu_range)
        loss = batch_loss(unet, vae, export.scheduler, spec, thick, thin, regression_fraction=regression_fraction,
                          generator=generator, device=device)
        if not torch.isfinite(loss):
            raise ValueError(f"adaptation diverged: non-finite loss at step {step}; lower --adapt_lr (was {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            recent = losses[-every:]
            logger.info("adapt step %d/%d: loss %.4f (mean of the last %d), %.1f s", step, steps,
                        sum(recent) / len(recent), len(recent), time.perf_counter() - start)
    unet.eval()
    for parameter in unet.parameters():
        parameter.requires_grad_(False)
    shapes = [{"axis": p.axis, "thick_shape": list(p.thick_hu.shape), "thin_shape": list(p.thin_hu.shape)}
              for p in pairs]
    return Adaptation(unet=unet, losses=losses, pairs=shapes)


def adapt_export(export: Export, thick_hu: np.ndarray, spacing_mm, *, steps: int, seed: int = 0,
                 lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE,
                 device: torch.device | str = "cpu") -> Export:
    """A new Export whose U-Net is `export.unet` fine-tuned on the series' in-plane pairs (`adapt_unet`); the VAE
    and scheduler are shared with `export`, the meta is a copy with an `adapted` block."""
    result = adapt_unet(export, thick_hu, spacing_mm, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                        device=device)
    tail = result.losses[-max(1, len(result.losses) // 10):]  # one step's loss is one batch's: average the last 10%
    head = result.losses[: max(1, len(result.losses) // 10)]
    meta = copy.deepcopy(export.meta)
    meta["adapted"] = {
        "steps": steps, "seed": seed, "lr": lr, "batch_size": batch_size, "regression_fraction": REGRESSION_FRACTION,
        "source": "in-plane pairs of the interpolated series (ctld.adapt)", "pairs": result.pairs,
        "first_loss": round(sum(head) / len(head), 6), "final_loss": round(sum(tail) / len(tail), 6),
    }
    return Export(vae=export.vae, unet=result.unet, scheduler=export.scheduler, meta=meta)


def save_adapted(export: Export, directory: str | Path) -> Path:
    """Write an adapted export as a complete export folder (atomically, `ctld.export.save_export`); `ctld-infer
    --checkpoint DIR` then runs it like any export."""
    if "adapted" not in export.meta:
        raise ValueError("save_adapted: this export was not adapted (its meta has no 'adapted' block)")
    meta = {k: v for k, v in export.meta.items() if k != "format_version"}
    return save_export(directory, vae=export.vae, unet=export.unet, scheduler=export.scheduler, meta=meta)
