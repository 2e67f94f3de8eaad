"""Pure array transforms (MONAI's array.py style); sample-dict wrappers live next to their users.

Intensity contract (DESIGN.md, Intensities): x = 2 * clip((HU - hu_min) / (hu_max - hu_min), 0, 1) - 1.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def hu_to_model(hu: ArrayLike, hu_min: float, hu_max: float) -> ArrayLike:
    """HU -> [-1, 1] float32 (numpy in, numpy out; torch in, torch out)."""
    if hu_max <= hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    scale = 2.0 / (hu_max - hu_min)
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - hu_min) * scale - 1.0).clamp_(-1.0, 1.0)
    return np.clip((hu.astype(np.float32) - hu_min) * scale - 1.0, -1.0, 1.0).astype(np.float32)


def model_to_hu(x: ArrayLike, hu_min: float, hu_max: float) -> ArrayLike:
    """[-1, 1] -> HU as float; exact inverse of `hu_to_model` inside [hu_min, hu_max]."""
    if isinstance(x, torch.Tensor):
        return (x.float().clamp(-1.0, 1.0) + 1.0) * (0.5 * (hu_max - hu_min)) + hu_min
    return (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) * (0.5 * (hu_max - hu_min)) + hu_min


def hu_to_int16(hu: ArrayLike) -> np.ndarray:
    """Round float HU to int16 for writing back (DICOM/NIfTI), saturating instead of wrapping."""
    if isinstance(hu, torch.Tensor):
        hu = hu.detach().cpu().double().numpy()
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def window_to_unit(hu: ArrayLike, lo: float, hi: float) -> ArrayLike:
    """HU -> [0, 1] in the window [lo, hi] (metrics and pictures; DESIGN.md, Intensities)."""
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def simulate_thick(thin_hu: np.ndarray, factor: int) -> np.ndarray:
    """Thick slice k = mean of thin slices [k*factor, (k+1)*factor); trailing thin slices that do not fill
    a slab are left out. (D, H, W) -> (D // factor, H, W), rounded back to the input dtype."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    depth = (thin_hu.shape[0] // factor) * factor
    if depth == 0:
        raise ValueError(f"need at least factor={factor} thin slices to make one thick slice, got {thin_hu.shape[0]}")
    slabs = thin_hu[:depth].reshape(depth // factor, factor, *thin_hu.shape[1:])
    if np.issubdtype(thin_hu.dtype, np.integer):
        # Integer sums are exact, and converting only the sums (not the whole thin volume) to float is what
        # keeps this cheap inside the shard builder.
        sums = slabs.sum(axis=1, dtype=np.int64)
        return np.rint(sums / factor).astype(thin_hu.dtype)
    return slabs.mean(axis=1, dtype=np.float64).astype(thin_hu.dtype)
