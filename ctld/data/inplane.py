"""In-plane training pairs: thick/thin pairs made from a thick series alone (self-supervision in the spirit of SMORE,
Zhao et al. 2020).

A thick series is coarse only along its slice axis: its in-plane pixels (0.5-0.9 mm) are finer than the thin
spacing we want. So one in-plane axis at a time plays the slice axis: it is resampled (linear) to the thin spacing
`t = thick dz / factor`, which gives the "thin" side; the "thick" side is made from it exactly as a thick slice is
made from thin ones (`simulate_thick`: the slice profile over `factor` thin samples); then that axis moves into the
depth position, so the pair has the layout of a real pair (depth, H, W):

    axis "y": thin (L, D, W) with spacing (t, dz, dx), thick (L / factor, D, W) with spacing (t * factor, dz, dx)
    axis "x": thin (L, D, H) with spacing (t, dz, dy), thick (L / factor, D, H)

Their in-plane grid is (slices, pixels) of the original, so it is coarse along one axis: the model learns the
through-plane task from the anatomy the archive actually holds, for its own scanner, kernel and profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctld.data.transforms import simulate_thick

AXES = {"y": 1, "x": 2}  # in-plane axis name -> its index in (D, H, W)


@dataclass(frozen=True)
class InplanePair:
    axis: str  # "y" or "x": the in-plane axis that plays the slice axis
    thin_hu: np.ndarray  # (L, D, other) int16, L a multiple of factor
    thick_hu: np.ndarray  # (L // factor, D, other) int16
    thin_spacing_mm: tuple[float, float, float]  # (t, dz, d_other)
    thick_spacing_mm: tuple[float, float, float]  # (t * factor, dz, d_other)


def resample_axis(hu: np.ndarray, axis: int, spacing_mm: float, new_spacing_mm: float) -> tuple[np.ndarray, float]:
    """Linear resampling of one axis to about `new_spacing_mm`, first and last sample kept (corner-aligned), so the
    exact new spacing is (n - 1) * spacing / (m - 1); returns (float32 array, that spacing)."""
    from scipy.ndimage import zoom

    length = hu.shape[axis]
    count = max(2, int(round((length - 1) * spacing_mm / new_spacing_mm)) + 1)
    factors = [1.0] * hu.ndim
    factors[axis] = count / length
    out = zoom(hu.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
    assert out.shape[axis] == count, (out.shape, count)
    return out, (length - 1) * spacing_mm / (count - 1)


def inplane_pair(hu: np.ndarray, spacing_mm, *, axis: str, factor: int, profile: str = "box",
                 thin_spacing_mm: float | None = None) -> InplanePair:
    """The in-plane pair of a (D, H, W) HU series along `axis` ("y" or "x"); see the module docstring.

    Args:
        hu: the thick series, (D, H, W) HU.
        spacing_mm: its (dz, dy, dx).
        axis: the in-plane axis that plays the slice axis.
        factor: thin samples per thick sample (the model's factor).
        profile: slice profile of the simulated thick side (`data.thick_profile`).
        thin_spacing_mm: the thin spacing to resample to (default: dz / factor, what the series' thin version
            would have).
    """
    if axis not in AXES:
        raise ValueError(f"in-plane axis must be one of {sorted(AXES)}, got {axis!r}")
    dz = float(spacing_mm[0])
    target = float(thin_spacing_mm or dz / factor)
    index = AXES[axis]
    thin, exact_mm = resample_axis(np.asarray(hu), index, float(spacing_mm[index]), target)
    thin = np.moveaxis(thin, index, 0)  # (L, D, other): the in-plane axis is now the depth axis
    length = (thin.shape[0] // factor) * factor
    if length < factor:
        raise ValueError(f"axis {axis} of {hu.shape} at {spacing_mm[index]} mm gives fewer than {factor} thin samples")
    thin = np.clip(np.rint(thin[:length]), -32768, 32767).astype(np.int16)
    thick = simulate_thick(thin, factor, profile)
    other = float(spacing_mm[3 - index])  # the in-plane axis that stays in-plane
    return InplanePair(axis=axis, thin_hu=thin, thick_hu=thick, thin_spacing_mm=(exact_mm, dz, other),
                       thick_spacing_mm=(exact_mm * factor, dz, other))


def inplane_pairs(hu: np.ndarray, spacing_mm, *, factor: int, profile: str = "box",
                  thin_spacing_mm: float | None = None) -> list[InplanePair]:
    """Both in-plane pairs ("y" and "x") of a thick series."""
    return [inplane_pair(hu, spacing_mm, axis=axis, factor=factor, profile=profile, thin_spacing_mm=thin_spacing_mm)
            for axis in AXES]
