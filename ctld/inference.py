"""Whole-series inference: a thick CT series in, a thin series out (`ctld-infer`).

    ctld-infer thick_series/ --checkpoint runs/ctld/export --out thin/ --format dicom --sampler ddim --steps 20
    ctld-infer thick.nii.gz --checkpoint runs/ctld/export --out thin.nii.gz --format nifti --seed 1

The engine (`interpolate_volume`) is a sliding-window inferer in the spirit of MONAI's SlidingWindowInferer:
- depth: windows of `depth_thick` thick slices. The `depth_context` slices at each end of a window are context
  only (their output is dropped), so every thin slice comes from a window that sees `depth_context` thick slices
  on both sides; the volume is padded at its ends by replicating the edge slice, so the first and last slices
  get the same context. Neighbouring windows share `depth_overlap` contributing thick slices, blended.
- in-plane: tiles of `patch_size` pixels overlapping by `inplane_overlap` of a tile; images smaller than a tile
  are padded with air (-1024 HU).
- blending: in-plane, Gaussian weights (sigma = 1/8 of the tile, as MONAI) that favour tile centres; in depth,
  a linear cross-fade over the `depth_overlap` shared slices (a Gaussian would jump from one window to the next
  within a slice or two of a short overlap). The windows form a grid, so the normaliser is separable (depth
  profile x in-plane map) and costs no full volume.
- memory: the output volume is accumulated in place, windows are made batch by batch; nothing else scales
  with the series length.
With `predict_fn` = per-window cubic interpolation, the result equals cubic interpolation of the whole volume
(tests/test_inference.py), which is what makes the stitching trustworthy for the diffusion model.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ctld.baselines import METHODS, interpolate_z
from ctld.config import ConfigError, InferConfig, load_config
from ctld.data.transforms import hu_to_int16, hu_to_model, model_to_hu
from ctld.data.volume import Volume

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
# (B, 1, depth, P, P) float32 window batch -> (B, 1, depth * factor, P, P), in model units or HU (see hu_range).
# A predictor with a `prior_fn` attribute is also given the matching windows of its prior (B, 1, depth * factor,
# P, P) as a second argument: the prior is computed once on the whole (padded) volume, so a window's edge slices
# get the same filter taps as its interior.
PredictFn = Callable[..., torch.Tensor]


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, length) with the last window flush with the end (length >= window)."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def gaussian_weights(length: int, sigma_scale: float = 0.125) -> np.ndarray:
    """1D Gaussian blending weights centred on the extent, min-clamped so no pixel gets weight 0 (MONAI)."""
    centre = (length - 1) / 2.0
    sigma = max(length * sigma_scale, 1e-3)
    weights = np.exp(-0.5 * ((np.arange(length) - centre) / sigma) ** 2)
    weights = weights / weights.max()
    return np.maximum(weights, 1e-4).astype(np.float32)


def crossfade_weights(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, linear ramps over `overlap` samples at both ends: neighbours that share `overlap` samples
    cross-fade linearly (their weights sum to 1 there), so no seam appears even when the overlap is a few slices,
    where a Gaussian would switch from one window to the next within one or two slices."""
    ramp = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)) / (overlap + 1.0)
    return np.minimum(ramp, 1.0).astype(np.float32)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows go; everything in padded coordinates unless named `_out`."""

    depth: int  # thick slices of the input
    height: int
    width: int
    factor: int
    depth_thick: int
    depth_context: int
    patch_size: int
    pad_depth_end: int  # replicated slices added after the `depth_context` ones at the end (short volumes)
    pad_y: int  # air rows added before the image (in-plane centring of small images)
    pad_x: int
    padded_shape: tuple[int, int, int]
    depth_starts: tuple[int, ...]
    y_starts: tuple[int, ...]
    x_starts: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return len(self.depth_starts) * len(self.y_starts) * len(self.x_starts)


def plan_windows(
    shape: tuple[int, int, int],
    *,
    factor: int,
    depth_thick: int,
    patch_size: int,
    depth_context: int,
    depth_overlap: int,
    inplane_overlap: float,
) -> WindowPlan:
    """Lay out the depth windows and in-plane tiles for a thick volume of `shape` (D, H, W)."""
    depth, height, width = shape
    if min(shape) < 1:
        raise ValueError(f"empty volume of shape {shape}")
    if factor < 1 or depth_thick < 1 or patch_size < 1:
        raise ValueError(f"factor, depth_thick and patch_size must be >= 1, got {factor}, {depth_thick}, {patch_size}")
    depth_stride = depth_thick - 2 * depth_context - depth_overlap
    if depth_context < 0 or depth_overlap < 0 or depth_stride < 1:
        raise ValueError(
            f"depth windows of {depth_thick} thick slices cannot keep {depth_context} context slices at each end "
            f"and share {depth_overlap} with the next window (need depth_thick - 2*depth_context - depth_overlap "
            f">= 1, got {depth_stride}); lower infer.depth_context or infer.depth_overlap"
        )
    if not 0.0 <= inplane_overlap < 1.0:
        raise ValueError(f"inplane_overlap must be in [0, 1), got {inplane_overlap}")
    padded_depth = max(depth + 2 * depth_context, depth_thick)
    pad_depth_end = padded_depth - depth - 2 * depth_context
    padded_height, padded_width = max(height, patch_size), max(width, patch_size)
    tile_stride = max(1, int(round(patch_size * (1.0 - inplane_overlap))))
    return WindowPlan(
        depth=depth,
        height=height,
        width=width,
        factor=factor,
        depth_thick=depth_thick,
        depth_context=depth_context,
        patch_size=patch_size,
        pad_depth_end=pad_depth_end,
        pad_y=(padded_height - height) // 2,
        pad_x=(padded_width - width) // 2,
        padded_shape=(padded_depth, padded_height, padded_width),
        depth_starts=tuple(_starts(padded_depth, depth_thick, depth_stride)),
        y_starts=tuple(_starts(padded_height, patch_size, tile_stride)),
        x_starts=tuple(_starts(padded_width, patch_size, tile_stride)),
    )


def _pad(thick_hu: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Replicate the edge slices along depth (context for the end slices); air around small images."""
    _, padded_height, padded_width = plan.padded_shape
    pad_y_end = padded_height - plan.height - plan.pad_y
    pad_x_end = padded_width - plan.width - plan.pad_x
    out = np.pad(thick_hu, ((plan.depth_context, plan.depth_context + plan.pad_depth_end), (0, 0), (0, 0)), mode="edge")
    if plan.pad_y or pad_y_end or plan.pad_x or pad_x_end:
        out = np.pad(out, ((0, 0), (plan.pad_y, pad_y_end), (plan.pad_x, pad_x_end)), constant_values=AIR_HU)
    return out


def interpolate_volume(
    thick_hu: np.ndarray,
    predict_fn: PredictFn,
    *,
    factor: int,
    depth_thick: int,
    patch_size: int,
    hu_range: tuple[float, float] | None,
    depth_context: int = 2,
    depth_overlap: int = 1,
    inplane_overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Thin volume from a thick one by sliding `predict_fn` over windows and blending.

    Args:
        thick_hu: (D, H, W) thick HU, D in increasing position along the slice normal.
        predict_fn: (B, 1, depth_thick, P, P) float32 on `device` -> (B, 1, depth_thick * factor, P, P); with a
            `prior_fn` attribute (whole padded thick volume -> its thin-grid prior) it also gets the prior's windows.
        factor: thin slices per thick slice.
        depth_thick: thick slices per window (the model's training depth).
        patch_size: in-plane tile edge P in pixels.
        hu_range: (hu_min, hu_max): windows go to `predict_fn` in model units [-1, 1] (`hu_to_model`) and its
            output is mapped back with `model_to_hu`; None: `predict_fn` works in HU directly.
        depth_context: thick slices at each window end that are context only.
        depth_overlap: contributing thick slices shared by neighbouring windows (blended).
        inplane_overlap: fraction of a tile shared with its neighbour.
        batch_size: windows per `predict_fn` call.

    Returns:
        (D * factor, H, W) float32 thin HU on the grid of DESIGN.md (thin slice m of slab k = m // factor).
    """
    thick_hu = np.asarray(thick_hu)
    if thick_hu.ndim != 3:
        raise ValueError(f"interpolate_volume needs a (D, H, W) thick volume, got shape {thick_hu.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_windows(
        thick_hu.shape,
        factor=factor,
        depth_thick=depth_thick,
        patch_size=patch_size,
        depth_context=depth_context,
        depth_overlap=depth_overlap,
        inplane_overlap=inplane_overlap,
    )
    padded = _pad(thick_hu, plan)
    prior_fn = getattr(predict_fn, "prior_fn", None)
    prior_volume = None
    if prior_fn is not None:  # (D_pad * factor, H_pad, W_pad), in the predictor's units
        whole = hu_to_model(padded, *hu_range) if hu_range is not None else padded.astype(np.float32)
        prior_volume = np.asarray(prior_fn(whole), dtype=np.float32)
    thin_depth = plan.depth * factor
    # Accumulate where the model runs: on a GPU this avoids a host round trip per window (the whole thin volume,
    # 300x512x512 float32 = 0.3 GB, is small next to the models' activations).
    out = torch.zeros((thin_depth, plan.height, plan.width), dtype=torch.float32, device=device)

    # Each window contributes thin slices [context*f, (depth_thick - context)*f) of its output.
    keep_lo, keep_hi = depth_context * factor, (depth_thick - depth_context) * factor
    depth_weights = torch.from_numpy(crossfade_weights(keep_hi - keep_lo, depth_overlap * factor))
    tile_weights_1d = gaussian_weights(patch_size)
    tile_weights = torch.from_numpy(np.outer(tile_weights_1d, tile_weights_1d))
    depth_weights_dev, tile_weights_dev = depth_weights.to(device), tile_weights.to(device)

    # Separable normaliser: the windows form a grid (depth starts x tile starts).
    depth_norm = torch.zeros(thin_depth, dtype=torch.float64)
    for start in plan.depth_starts:
        lo, hi, src_lo, _ = _depth_span(start, plan, keep_lo, keep_hi)
        if hi > lo:
            depth_norm[lo:hi] += depth_weights[src_lo : src_lo + hi - lo].double()
    plane_norm = torch.zeros(plan.padded_shape[1:], dtype=torch.float64)
    for y0 in plan.y_starts:
        for x0 in plan.x_starts:
            plane_norm[y0 : y0 + patch_size, x0 : x0 + patch_size] += tile_weights.double()
    plane_norm = plane_norm[plan.pad_y : plan.pad_y + plan.height, plan.pad_x : plan.pad_x + plan.width]
    assert bool((depth_norm > 0).all()) and bool((plane_norm > 0).all()), "windows leave a gap"

    windows = [(d0, y0, x0) for d0 in plan.depth_starts for y0 in plan.y_starts for x0 in plan.x_starts]
    logger.info(
        "%d thick slices %dx%d -> %d thin: %d depth windows x %d tiles = %d windows, batch %d",
        plan.depth, plan.height, plan.width, thin_depth, len(plan.depth_starts),
        len(plan.y_starts) * len(plan.x_starts), len(windows), batch_size,
    )
    with tqdm(total=len(windows), desc="windows", unit="win", disable=not progress) as bar:
        for batch_windows in _batches(windows, batch_size):
            batch = np.stack(
                [padded[d0 : d0 + depth_thick, y0 : y0 + patch_size, x0 : x0 + patch_size] for d0, y0, x0 in
                 batch_windows]
            )[:, None]  # (B, 1, depth_thick, P, P)
            thick = torch.from_numpy(batch.astype(np.float32)).to(device)
            if hu_range is not None:
                thick = hu_to_model(thick, *hu_range)
            with torch.no_grad():
                if prior_volume is None:
                    pred = predict_fn(thick)
                else:
                    prior = np.stack([prior_volume[d0 * factor : (d0 + depth_thick) * factor, y0 : y0 + patch_size,
                                                   x0 : x0 + patch_size] for d0, y0, x0 in batch_windows])[:, None]
                    pred = predict_fn(thick, torch.from_numpy(prior).to(device))
            expected = (len(batch_windows), 1, depth_thick * factor, patch_size, patch_size)
            if tuple(pred.shape) != expected:
                raise RuntimeError(f"predict_fn returned shape {tuple(pred.shape)}, expected {expected}")
            pred = pred.float().to(device)
            if hu_range is not None:
                pred = model_to_hu(pred, *hu_range)
            for (d0, y0, x0), window in zip(batch_windows, pred[:, 0], strict=True):
                _accumulate(out, window, (d0, y0, x0), plan, keep_lo, keep_hi, depth_weights_dev, tile_weights_dev)
            bar.update(len(batch_windows))
    out /= depth_norm.float().to(device)[:, None, None]
    out /= plane_norm.float().to(device)[None]
    return out.cpu().numpy()


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _depth_span(start: int, plan: WindowPlan, keep_lo: int, keep_hi: int) -> tuple[int, int, int, int]:
    """Output thin rows [lo, hi) written by the window starting at padded thick slice `start`, and the window's
    rows [src_lo, src_lo + hi - lo) (relative to its kept part) that land there."""
    thin_depth = plan.depth * plan.factor
    first = (start - plan.depth_context) * plan.factor + keep_lo  # output thin index of the first kept row
    lo, hi = max(first, 0), min(first + keep_hi - keep_lo, thin_depth)
    return lo, hi, lo - first, keep_lo + lo - first


def _accumulate(out, window, origin, plan, keep_lo, keep_hi, depth_weights, tile_weights) -> None:
    d0, y0, x0 = origin
    lo, hi, src_lo, row_lo = _depth_span(d0, plan, keep_lo, keep_hi)
    if hi <= lo:
        return
    # In-plane: crop the air padding.
    oy0, ox0 = y0 - plan.pad_y, x0 - plan.pad_x
    ys, xs = max(oy0, 0), max(ox0, 0)
    ye, xe = min(oy0 + plan.patch_size, plan.height), min(ox0 + plan.patch_size, plan.width)
    if ye <= ys or xe <= xs:
        return
    rows = window[row_lo : row_lo + hi - lo, ys - oy0 : ye - oy0, xs - ox0 : xe - ox0]
    weights = depth_weights[src_lo : src_lo + hi - lo, None, None] * tile_weights[None, ys - oy0 : ye - oy0,
                                                                                  xs - ox0 : xe - ox0]
    out[lo:hi, ys:ye, xs:xe] += rows * weights


# --------------------------------------------------------------------------------------------------------------
# Predictors: what runs inside a window.


def baseline_predictor(factor: int, method: str) -> PredictFn:
    """A window predictor that interpolates along z (use with `hu_range=None`): the same code path as the model,
    for checking the stitching and the evaluation against `ctld.baselines`."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {list(METHODS)}")
    return lambda thick: interpolate_z(thick, factor, method)


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA; fp32 elsewhere (bf16 Conv3d on CPU is 35x slower, STACK.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class CtldPredictor:
    """thick window -> prior latent -> the residual model (one regression pass, or diffusion samples averaged)
    -> VAE decode.

    Args:
        export: a loaded `ctld.export.Export` with a U-Net and a scheduler.
        mode: "regression" (one pass: the conditional mean) or "diffusion" (samples started from the prior plus the
            one-pass residual estimate, noised to the export's strength).
        sampler: "ddim" | "dpm" | "ddpm" (built from the export's training scheduler config), diffusion mode.
        num_inference_steps: sampler steps per window below the export's strength, diffusion mode.
        num_samples: diffusion samples averaged per window (their mean is a lower-variance estimate).
        seed: seeds the sampling noise; the same seed, settings and batch size give the same output.
        device: where the models run.
    """

    def __init__(self, export, *, mode: str = "regression", sampler: str = "ddim", num_inference_steps: int = 4,
                 num_samples: int = 1, seed: int = 0, device: torch.device | str = "cpu"):
        from ctld.diffusion import ResidualSpec, build_sampler

        if export.unet is None or export.scheduler is None:
            raise ValueError(
                "the export holds no diffusion U-Net/scheduler (a VAE-only export); ctld-infer needs the export of a "
                "diffusion-stage run (use `ctld-eval --vae` to measure a VAE export)"
            )
        if mode not in ("regression", "diffusion"):
            raise ValueError(f"unknown inference mode {mode!r}; choose regression or diffusion")
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError(f"num_samples and num_inference_steps must be >= 1, got {num_samples}, "
                             f"{num_inference_steps}")
        self.vae, self.unet = export.vae, export.unet
        self.spec = ResidualSpec.from_meta(export.meta)
        self.mode = mode
        self.sampler = build_sampler(sampler, export.scheduler.config)
        self.num_inference_steps = num_inference_steps
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # The engine computes pixel-space priors once per volume; a latent-space prior comes from each window.
        self.prior_fn = None if self.spec.prior == "latent_cubic" else self.spec.prior_pixels

    def __call__(self, thick: torch.Tensor, prior_pixels: torch.Tensor | None = None) -> torch.Tensor:
        from ctld.diffusion import decode_latents, regress, sample

        spec = self.spec
        with autocast_context(self.device):
            prior = spec.prior_latents(self.vae, thick, pixels=prior_pixels)
            if self.mode == "regression":
                latents = regress(self.unet, prior, residual_scale=spec.residual_scale,
                                  num_train_timesteps=spec.num_train_timesteps)
                return decode_latents(self.vae, latents).float()
            total = None
            for _ in range(self.num_samples):
                latents = sample(self.unet, self.sampler, prior, residual_scale=spec.residual_scale,
                                 strength=spec.strength, num_inference_steps=self.num_inference_steps,
                                 generator=self.generator)
                thin = decode_latents(self.vae, latents).float()
                total = thin if total is None else total + thin
        return total / self.num_samples


def prior_predictor(export, device: torch.device | str = "cpu") -> PredictFn:
    """The export's prior alone, decoded: what an untrained residual model returns (a check of the anchor)."""
    from ctld.diffusion import ResidualSpec, decode_latents

    spec = ResidualSpec.from_meta(export.meta)
    vae = export.vae

    def predict(thick: torch.Tensor, prior_pixels: torch.Tensor | None = None) -> torch.Tensor:
        with autocast_context(device):
            return decode_latents(vae, spec.prior_latents(vae, thick, pixels=prior_pixels)).float()

    predict.prior_fn = None if spec.prior == "latent_cubic" else spec.prior_pixels
    return predict


def vae_predictor(vae, device: torch.device | str = "cpu") -> PredictFn:
    """encode -> posterior mode -> decode (factor 1): the VAE's reconstruction, for its quality ceiling."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device):
            return vae.decode(vae.encode(x).mode()).float()

    return predict


# --------------------------------------------------------------------------------------------------------------
# Geometry and input checks.


def thin_volume_like(thick: Volume, thin_hu: np.ndarray, factor: int) -> Volume:
    """The thin Volume on the grid of DESIGN.md: spacing dz / factor, origin shifted by -(factor - 1) / 2 thin
    spacings along the normal, the thick series' in-plane grid, orientation and ids."""
    dz, dy, dx = thick.spacing_mm
    thin_dz = dz / factor
    normal = np.asarray(thick.direction)[:, 2]
    origin = np.asarray(thick.origin_mm) - (factor - 1) / 2.0 * thin_dz * normal
    if thin_hu.shape != (thick.shape[0] * factor, *thick.shape[1:]):
        raise ValueError(f"thin volume of shape {thin_hu.shape} does not fit thick {thick.shape} x factor {factor}")
    return Volume(
        hu=hu_to_int16(thin_hu),
        spacing_mm=(thin_dz, dy, dx),
        origin_mm=tuple(origin),
        direction=thick.direction,
        case_id=thick.case_id,
        study_id=thick.study_id,
        frame_of_reference_id=thick.frame_of_reference_id,
        modality=thick.modality,
        meta={"slice_thickness_mm": thin_dz, "source": "ctld", "factor": factor},
    )


def check_thick_volume(volume: Volume, *, factor: int, thin_spacing_mm: float, spacing_tolerance: float,
                       name: str) -> None:
    """Refuse what the model cannot handle, naming the series: a sheared grid (gantry tilt) and a slice spacing
    that is not about `factor` x the thin spacing the model was trained for (e.g. an already thin series).

    Non-uniform spacing and gantry tilt are refused by the DICOM reader (strict); this re-checks the geometry of
    any Volume (NIfTI included).
    """
    direction = np.asarray(volume.direction)
    gram = direction.T @ direction
    if np.abs(gram - np.eye(3)).max() > 1e-3:
        plane_normal = np.cross(direction[:, 0], direction[:, 1])
        cosine = abs(float(plane_normal @ direction[:, 2])) / max(float(np.linalg.norm(plane_normal)), 1e-12)
        angle = math.degrees(math.acos(min(1.0, cosine)))
        raise ValueError(
            f"{name}: the slice axis is {angle:.1f} deg off the image plane's normal (gantry tilt or a sheared "
            f"affine); ctld needs an orthogonal grid. Resample the series without tilt first."
        )
    dz = volume.spacing_mm[0]
    expected = factor * thin_spacing_mm
    if spacing_tolerance >= 0 and abs(dz / expected - 1.0) > spacing_tolerance:
        raise ValueError(
            f"{name}: slice spacing {dz:.3f} mm does not fit this model: it turns {expected:.3g} mm slices into "
            f"{thin_spacing_mm:.3g} mm (factor {factor}, tolerance {spacing_tolerance:.0%}). Pass a thick series of "
            f"about {expected:.3g} mm spacing, or --spacing_tolerance=-1 to run anyway."
        )
    thickness = float(volume.meta.get("slice_thickness_mm", dz) or dz)
    if abs(thickness / dz - 1.0) > 0.1:
        logger.warning(
            "%s: slice thickness %.2f mm differs from the spacing %.2f mm (overlapping or gapped reconstruction); the "
            "model assumes each thick slice averages the %d thin slices it covers", name, thickness, dz, factor
        )


def read_input(path: str | Path, *, series_id: str = "", salt: str = ""):
    """One thick series from a DICOM folder/ZIP or a NIfTI file -> (Volume, reference dataset or None, kind)."""
    from ctld.data.dicom import Policy, read_dicom_series
    from ctld.data.nifti import is_nifti, read_nifti

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; pass a DICOM folder or ZIP, or a NIfTI file")
    if is_nifti(path):
        return read_nifti(path, salt), None, "nifti"
    # Refuse (strict) rather than repair: an output must sit on the input's own grid.
    policy = Policy(min_slices=2, on_duplicate_positions="repair", on_missing_slices="skip",
                    on_nonuniform_spacing="skip", on_gantry_tilt="skip")
    found = read_dicom_series(path, salt=salt, policy=policy, strict=True, with_reference=True)
    if series_id:
        found = [pair for pair in found if pair[0].series_id == series_id]
    if not found:
        raise ValueError(f"{path}: no readable CT series" + (f" with series id {series_id}" if series_id else ""))
    if len(found) > 1:
        listing = "; ".join(f"{v.series_id}: {v.shape[0]} slices at {v.spacing_mm[0]:.2f} mm" for v, _ in found)
        raise ValueError(f"{path} holds {len(found)} CT series ({listing}); pick one with --series_id")
    volume, reference = found[0]
    return volume, reference, "dicom"


def write_output(thin: Volume, out: str | Path, fmt: str, *, reference=None, stem: str = "thin") -> list[Path]:
    """Write the thin volume as a DICOM series folder and/or a NIfTI file; returns what was written."""
    from ctld.data.dicom_write import write_dicom_series
    from ctld.data.nifti import is_nifti, write_nifti

    out = Path(out)
    written = []
    if fmt in ("nifti", "both"):
        nifti_path = out if (fmt == "nifti" and is_nifti(out)) else out / f"{stem}.nii.gz"
        written.append(write_nifti(thin, nifti_path))
    if fmt in ("dicom", "both"):
        dicom_dir = out if fmt == "dicom" else out / "dicom"
        if dicom_dir.exists() and any(dicom_dir.iterdir()):
            raise FileExistsError(f"DICOM output folder {dicom_dir} is not empty; pass a new folder")
        # Write into a temporary sibling and rename, so a PACS watcher never sees half a series.
        tmp = dicom_dir.with_name(f".{dicom_dir.name}.tmp-ctld")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        number = int(getattr(reference, "SeriesNumber", 0) or 0) + 1000 if reference is not None else 1000
        source = str(getattr(reference, "SeriesDescription", "") or "") if reference is not None else ""
        description = f"ctld {thin.spacing_mm[0]:.3g}mm" + (f" from {source}" if source else "")
        write_dicom_series(thin, tmp, reference=reference, derived=True, series_description=description[:29],
                           series_number=number)
        if dicom_dir.exists():
            dicom_dir.rmdir()
        dicom_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dicom_dir)
        written.append(dicom_dir)
    return written


# --------------------------------------------------------------------------------------------------------------
# CLI


def infer_config_from(args: argparse.Namespace) -> InferConfig:
    """InferConfig from --config's infer section (or the defaults), with the CLI flags that were given on top."""
    cfg = load_config(args.config).infer if args.config else InferConfig()
    values = {f.name: getattr(cfg, f.name) for f in fields(InferConfig)}
    for name in values:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    try:
        return InferConfig(**values)
    except (TypeError, ConfigError) as error:
        raise ValueError(f"bad inference settings: {error}") from error


def add_infer_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ctld-infer and ctld-eval; unset ones come from --config's infer section (base.yaml)."""
    parser.add_argument("--config", default=None, help="YAML config whose `infer` section gives the defaults")
    parser.add_argument("--mode", choices=("regression", "diffusion"), default=None,
                        help="regression: one pass, the conditional mean (best PSNR, fastest); diffusion: samples "
                             "started from the anchored one-pass estimate noised to the export's strength, "
                             "averaged over --num_samples")
    parser.add_argument("--sampler", choices=("ddim", "dpm", "ddpm"), default=None, help="sampling scheduler")
    parser.add_argument("--steps", dest="num_inference_steps", type=int, default=None,
                        help="diffusion mode: denoising steps")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling noise (reproducible output)")
    parser.add_argument("--num_samples", type=int, default=None, help="diffusion samples averaged per window")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--depth_context", type=int, default=None,
                        help="thick slices at each window end used only as context")
    parser.add_argument("--depth_overlap", type=int, default=None,
                        help="contributing thick slices shared (blended) by neighbouring windows")
    parser.add_argument("--inplane_overlap", type=float, default=None, help="fraction of a tile shared by neighbours")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def fit_depth_windows(depth_thick: int, depth_context: int, depth_overlap: int) -> tuple[int, int]:
    """Shrink overlap, then context, until a window of `depth_thick` keeps >= 1 contributing slice per step (tiny
    models train on 2-slice windows); warns when it changes the settings."""
    context, overlap = depth_context, depth_overlap
    while depth_thick - 2 * context - overlap < 1 and overlap > 0:
        overlap -= 1
    while depth_thick - 2 * context - overlap < 1 and context > 0:
        context -= 1
    if (context, overlap) != (depth_context, depth_overlap):
        logger.warning(
            "windows of %d thick slices cannot hold depth_context=%d and depth_overlap=%d; using %d and %d",
            depth_thick, depth_context, depth_overlap, context, overlap,
        )
    return context, overlap


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctld-infer",
        description="Thick CT series (DICOM folder/ZIP or NIfTI) -> thin series with a ctld export.",
    )
    parser.add_argument("input", help="thick series: a DICOM folder or ZIP holding one CT series, or a NIfTI file")
    parser.add_argument("--checkpoint", required=True, help="export folder of a diffusion run (runs/<name>/export)")
    parser.add_argument("--out", required=True,
                        help="output: a new folder (dicom, both) or a .nii/.nii.gz file or folder (nifti)")
    parser.add_argument("--format", choices=("dicom", "nifti", "both"), default=None,
                        help="output format (default: that of the input); both = OUT/dicom/ and OUT/thin.nii.gz")
    parser.add_argument("--series_id", default="", help="which series of a multi-series input (id from the error)")
    parser.add_argument("--spacing_tolerance", type=float, default=None,
                        help="refuse series whose spacing is off factor x thin spacing by more than this fraction; "
                             "-1 = never refuse")
    add_infer_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ctld.data.dicom import SeriesSkipped
    from ctld.export import load_export

    try:
        cfg = infer_config_from(args)
        device = pick_device(args.device)
        export = load_export(args.checkpoint, device)
        meta = export.meta
        factor = int(meta["factor"])
        volume, reference, kind = read_input(args.input, series_id=args.series_id)
        check_thick_volume(volume, factor=factor, thin_spacing_mm=float(meta.get("thin_spacing_mm", 1.0)),
                           spacing_tolerance=cfg.spacing_tolerance, name=str(args.input))
        predictor = CtldPredictor(export, mode=cfg.mode, sampler=cfg.sampler,
                                  num_inference_steps=cfg.num_inference_steps, num_samples=cfg.num_samples,
                                  seed=cfg.seed, device=device)
        depth_thick = int(meta["depth_thick"])
        context, overlap = fit_depth_windows(depth_thick, cfg.depth_context, cfg.depth_overlap)
        thin_hu = interpolate_volume(
            volume.hu, predictor, factor=factor, depth_thick=depth_thick,
            patch_size=int(meta["patch_size"]), hu_range=(float(meta["hu_min"]), float(meta["hu_max"])),
            depth_context=context, depth_overlap=overlap, inplane_overlap=cfg.inplane_overlap,
            batch_size=cfg.batch_size, device=device, progress=not args.no_progress,
        )
        thin = thin_volume_like(volume, thin_hu, factor)
        written = write_output(thin, args.out, args.format or kind, reference=reference)
    except (ValueError, FileNotFoundError, FileExistsError, SeriesSkipped) as error:
        print(f"ctld-infer: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
