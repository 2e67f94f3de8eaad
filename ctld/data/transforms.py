"""Pure array transforms (MONAI's array.py style); sample-dict wrappers live next to their users.

Intensity contract (docs/DESIGN.md, Intensities): x = 2 * clip((HU - hu_min) / (hu_max - hu_min), 0, 1) - 1.
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
    """Round float HU to int16 for writing back (DICOM/NIfTI), saturating instead of wrapping. NaN/Inf raise
    ValueError: a cast would write them as arbitrary HU into a series a reader trusts."""
    if isinstance(hu, torch.Tensor):
        hu = hu.detach().cpu().double().numpy()
    hu = np.asarray(hu)
    bad = hu.size - int(np.count_nonzero(np.isfinite(hu)))
    if bad:
        raise ValueError(
            f"{bad} of {hu.size} voxels are not finite (NaN/Inf), so nothing was written: the model diverged or "
            "the export is broken; check the export (its training log for non-finite losses) or use another one"
        )
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


# The HU windows (lo, hi) of metrics and pictures, in one table. "wide" keeps air to dense bone; "soft_tissue" is
# centre 40, width 400 (mediastinum); "lung" is centre -300, width 1400.
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "wide": (-1024.0, 2048.0),
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1000.0, 400.0),
}


def window_to_unit(hu: ArrayLike, lo: float, hi: float) -> ArrayLike:
    """HU -> [0, 1] in the window [lo, hi] (metrics and pictures; docs/DESIGN.md, Intensities)."""
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


THICK_PROFILES = ("box", "gaussian", "triangle")


def slice_profile_weights(factor: int, profile: str = "box") -> np.ndarray:
    """Weights of the thin slices around one thick slice centre, for offsets `-(n // 2) .. n // 2` thin slices
    from the slab's first thin slice + (factor - 1) / 2 (the slab centre); they sum to 1.

    box: the mean of the `factor` thin slices of the slab. gaussian / triangle: a slice sensitivity profile with
    FWHM = the thick slice thickness (`factor` thin slices), as a scanner's reconstructed slice has; the gaussian is
    cut at 3 sigma. Returned as (positions relative to the slab's first thin slice, weights)."""
    if profile not in THICK_PROFILES:
        raise ValueError(f"unknown thick slice profile {profile!r}; choose one of {list(THICK_PROFILES)}")
    centre = (factor - 1) / 2.0
    if profile == "box":
        positions = np.arange(factor)
        weights = np.ones(factor)
    elif profile == "gaussian":
        sigma = factor / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # FWHM = factor thin slices
        reach = int(np.ceil(3.0 * sigma + centre))
        positions = np.arange(-reach, reach + 1)
        weights = np.exp(-0.5 * ((positions - centre) / sigma) ** 2)
        keep = np.abs(positions - centre) <= 3.0 * sigma
        positions, weights = positions[keep], weights[keep]
    else:  # triangle: zero at +-factor from the centre, 1/2 at +-factor/2
        reach = int(np.ceil(factor + centre))
        positions = np.arange(-reach, reach + 1)
        weights = np.maximum(0.0, 1.0 - np.abs(positions - centre) / factor)
        keep = weights > 0
        positions, weights = positions[keep], weights[keep]
    return np.stack([positions.astype(np.float64), weights / weights.sum()])


def simulate_thick(thin_hu: np.ndarray, factor: int, profile: str = "box") -> np.ndarray:
    """Thick series from a thin one: thick slice k is centred on thin slices [k*factor, (k+1)*factor) and is the
    profile-weighted average of the thin slices around that centre (`slice_profile_weights`; box = the slab mean).
    Trailing thin slices that do not fill a slab are left out; at the volume ends the weights of the slices that
    exist are renormalised, so every profile keeps mean HU. (D, H, W) -> (D // factor, H, W), rounded back to
    the input dtype."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    depth = (thin_hu.shape[0] // factor) * factor
    if depth == 0:
        raise ValueError(f"need at least factor={factor} thin slices to make one thick slice, got {thin_hu.shape[0]}")
    if profile == "box":
        slabs = thin_hu[:depth].reshape(depth // factor, factor, *thin_hu.shape[1:])
        if np.issubdtype(thin_hu.dtype, np.integer):
            # Integer sums are exact, and converting only the sums (not the whole thin volume) to float is what
            # keeps this cheap inside the shard builder.
            small = thin_hu.dtype.itemsize <= 2 and factor <= 128
            sums = slabs.sum(axis=1, dtype=np.int32 if small else np.int64)
            if small:
                # float32 is exact here: |sums| < 2^24, a slab mean that is a half-integer is exactly one, and any
                # other mean lies >= 1/(2 factor) >= 2^-8 from a half-integer, more than float32's rounding error
                # (<= 2^-9 below 2^16). So rint rounds as in float64 (half to even), at a third of the time.
                means = sums.astype(np.float32)
                means /= np.float32(factor)
                return np.rint(means, out=means).astype(thin_hu.dtype)
            return np.rint(sums / factor).astype(thin_hu.dtype)
        return slabs.mean(axis=1, dtype=np.float64).astype(thin_hu.dtype)
    positions, weights = slice_profile_weights(factor, profile)
    out = np.empty((depth // factor, *thin_hu.shape[1:]), dtype=thin_hu.dtype)
    for k in range(depth // factor):
        index = k * factor + positions.astype(int)
        inside = (index >= 0) & (index < thin_hu.shape[0])
        w = weights[inside] / weights[inside].sum()
        slab = np.tensordot(w, thin_hu[index[inside]].astype(np.float64), axes=(0, 0))
        out[k] = np.rint(slab) if np.issubdtype(thin_hu.dtype, np.integer) else slab
    return out
