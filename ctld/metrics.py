"""Image-quality metrics on HU volumes, shared by `ctld-eval` and the trainer's validation.

Protocol (docs/DESIGN.md, Intensities), so numbers from both places agree:
- HU are mapped to [0, 1] in a named window (`WINDOWS`): `clip((hu - lo) / (hi - lo), 0, 1)`.
- PSNR = 10 log10(1 / MSE) over all voxels (data range 1), capped at `PSNR_CAP_DB` when the images are
  identical (MSE below 10**(-PSNR_CAP_DB / 10)), so metrics.json never holds an infinity.
- SSIM = `skimage.metrics.structural_similarity(data_range=1)` (7x7 uniform window, the skimage defaults) per
  2D axial slice, then the mean over slices.
- MAE in HU, without a window.

The field's protocol (RPLHR-CT, MICCAI 2022, and its TVSRN baseline) is computed beside ours (`rplhr_metrics`):
HU clipped to [-1024, 2048] and scaled to [0, 1], a few slices dropped at each end, PSNR with MAX = 1 per case,
SSIM per axial slice with an 11x11 Gaussian window (sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, as Wang et al. 2004),
averaged per case; means over cases are taken by the caller.

    from ctld.metrics import WINDOWS, psnr, ssim2d_mean, mae_hu
    psnr(pred_hu, target_hu, window=WINDOWS["soft_tissue"])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ctld.data.transforms import HU_WINDOWS, window_to_unit

# The windows every metric is reported in (ctld.data.transforms.HU_WINDOWS holds their HU ranges).
WINDOWS: dict[str, tuple[float, float]] = {name: HU_WINDOWS[name] for name in ("wide", "soft_tissue")}
PSNR_CAP_DB = 100.0

RPLHR_WINDOW = (-1024.0, 2048.0)
RPLHR_TRIM_SLICES = 5  # thin slices dropped at each end (one 5 mm slab)

PROTOCOL = {
    "windows_hu": {name: list(window) for name, window in WINDOWS.items()},
    "intensity": "HU clipped to the window and mapped to [0, 1]",
    "psnr": f"10*log10(1/MSE) over the whole volume, data range 1, capped at {PSNR_CAP_DB:g} dB",
    "ssim": "skimage.metrics.structural_similarity(data_range=1, win_size=7) per 2D axial slice, mean over slices",
    "mae_hu": "mean absolute error in HU over the whole volume, no window",
    "rplhr_psnr / rplhr_ssim": f"the RPLHR-CT protocol: HU clipped to {list(RPLHR_WINDOW)} and scaled to [0, 1], "
    f"{RPLHR_TRIM_SLICES} thin slices dropped at each end, PSNR with MAX 1 per case, SSIM per axial slice with an "
    "11x11 Gaussian window (sigma 1.5, K1 0.01, K2 0.03), mean over slices",
}


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _check_shapes(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim < 2:
        raise ValueError(f"metrics need images of at least 2 dimensions (..., H, W), got shape {pred.shape}")


def psnr(pred_hu, target_hu, window: tuple[float, float]) -> float:
    """PSNR in dB after mapping both to [0, 1] in `window`; `PSNR_CAP_DB` for identical images.

    Args:
        pred_hu, target_hu: HU arrays or tensors of equal shape, e.g. (D, H, W) or (B, 1, D, H, W).
        window: (lo, hi) HU, e.g. `WINDOWS["wide"]`.
    """
    pred, target = _as_numpy(pred_hu), _as_numpy(target_hu)
    _check_shapes(pred, target)
    lo, hi = window
    mse = float(np.mean((window_to_unit(pred, lo, hi) - window_to_unit(target, lo, hi)) ** 2))
    if mse <= 10.0 ** (-PSNR_CAP_DB / 10.0):
        return PSNR_CAP_DB
    return 10.0 * math.log10(1.0 / mse)


def ssim2d_mean(pred_hu, target_hu, window: tuple[float, float]) -> float:
    """Mean SSIM over 2D axial slices (the last two axes) after mapping to [0, 1] in `window`.

    Args:
        pred_hu, target_hu: HU of equal shape (..., H, W) with H, W >= 7; leading axes are flattened to slices.
        window: (lo, hi) HU.
    """
    pred, target = _as_numpy(pred_hu), _as_numpy(target_hu)
    _check_shapes(pred, target)
    if min(pred.shape[-2:]) < 7:
        raise ValueError(f"SSIM needs slices of at least 7x7 pixels (skimage's window), got {pred.shape[-2:]}")
    lo, hi = window
    pred_unit = window_to_unit(pred, lo, hi).reshape(-1, *pred.shape[-2:])
    target_unit = window_to_unit(target, lo, hi).reshape(-1, *target.shape[-2:])
    values = [
        structural_similarity(p, t, data_range=1.0) for p, t in zip(pred_unit, target_unit, strict=True)
    ]
    return float(np.mean(values))


def rplhr_metrics(pred_hu, target_hu, trim_slices: int = RPLHR_TRIM_SLICES) -> dict[str, float]:
    """`{"rplhr_psnr", "rplhr_ssim"}` of one (D, H, W) volume with the RPLHR-CT protocol (module docstring)."""
    pred, target = _as_numpy(pred_hu), _as_numpy(target_hu)
    _check_shapes(pred, target)
    if pred.ndim != 3:
        raise ValueError(f"the RPLHR protocol scores (D, H, W) volumes, got shape {pred.shape}")
    if pred.shape[0] > 2 * trim_slices:  # short volumes (tests, tiny windows) are scored whole
        pred, target = pred[trim_slices:-trim_slices], target[trim_slices:-trim_slices]
    lo, hi = RPLHR_WINDOW
    pred_unit, target_unit = window_to_unit(pred, lo, hi), window_to_unit(target, lo, hi)
    mse = float(np.mean((pred_unit - target_unit) ** 2))
    out = {"rplhr_psnr": PSNR_CAP_DB if mse <= 10.0 ** (-PSNR_CAP_DB / 10.0) else 10.0 * math.log10(1.0 / mse)}
    if min(pred.shape[-2:]) >= 11:
        out["rplhr_ssim"] = float(np.mean([
            structural_similarity(p, t, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, K1=0.01, K2=0.03)
            for p, t in zip(pred_unit, target_unit, strict=True)
        ]))
    else:
        out["rplhr_ssim"] = float("nan")
    return out


def mae_hu(pred_hu, target_hu) -> float:
    """Mean absolute error in HU."""
    pred, target = _as_numpy(pred_hu), _as_numpy(target_hu)
    _check_shapes(pred, target)
    return float(np.mean(np.abs(pred.astype(np.float64) - target.astype(np.float64))))


def all_metrics(pred_hu, target_hu, *, rplhr: bool = False) -> dict[str, float]:
    """`{"psnr_wide", "ssim_wide", "psnr_soft_tissue", "ssim_soft_tissue", "mae_hu"}` for one volume, plus
    `rplhr_psnr` and `rplhr_ssim` (the field's protocol) when `rplhr` is set."""
    pred, target = _as_numpy(pred_hu), _as_numpy(target_hu)
    out: dict[str, float] = {}
    for name, window in WINDOWS.items():
        out[f"psnr_{name}"] = psnr(pred, target, window)
        out[f"ssim_{name}"] = ssim2d_mean(pred, target, window)
    out["mae_hu"] = mae_hu(pred, target)
    if rplhr:
        out.update(rplhr_metrics(pred, target))
    return out
