"""Thick and thin grids, and how a thick series lines up with a thin one: one home, one set of tolerances.

The thin grid of a thick series (docs/DESIGN.md, Geometry convention): thick slice k at `z_k` (slice spacing
`dz`) becomes `factor` thin slices at `z_k + (i - (factor - 1) / 2) * dz / factor`, i = 0..factor-1, centred on
it. So thin row 0 sits `(factor - 1) / 2` thin spacings before thick slice 0, and in thick-index units thin row m
is at `(m + 0.5) / factor - 0.5` (`thin_positions`).

A thick series pairs with a thin one when both share orientation and in-plane grid, the spacing ratio is the
factor, and the thick slab centres fall on thin slices: thick slice k then covers thin rows
`[offset + k * factor, offset + (k + 1) * factor)` (`align`). The shard builder, `ctld-eval --pair`, the loader,
inference and the baselines all use these functions, so a pair accepted by one is accepted by all.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

# Tolerances of a thick/thin pair (and of a thick input's grid).
FACTOR_RTOL = 0.01  # thick dz / thin dz within 1% of the integer factor
INPLANE_SPACING_RTOL = 0.01  # pixel spacings within 1%
DIRECTION_ATOL = 1e-3  # direction cosines (about 0.06 degrees)
INPLANE_SHIFT_PX = 0.5  # in-plane origins within half a pixel
OFFSET_TOL_SLICES = 0.25  # thick slab centres within a quarter thin slice of the thin grid
ORTHOGONAL_ATOL = 1e-3  # direction columns orthonormal (no gantry tilt / shear)


class Grid(Protocol):
    """What alignment needs: a `Volume`, a pairing `Geometry` or a DICOM `SeriesPlan` all provide it."""

    shape: tuple[int, int, int]  # (D, H, W)
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]
    direction: np.ndarray  # (3, 3) columns: x (W), y (H), z (D, the slice normal)


class AlignmentError(ValueError):
    """A thick and a thin series do not form a pair; the message says why."""


def thin_positions(depth: int, factor: int) -> np.ndarray:
    """Thick-index coordinate of each thin row of a `depth`-slice thick series: (m + 0.5) / factor - 0.5."""
    return (np.arange(depth * factor) + 0.5) / factor - 0.5


def thin_origin_mm(thick_origin_mm, thick_dz_mm: float, direction, factor: int) -> np.ndarray:
    """Where thin row 0 of a thick series' thin grid sits: (factor - 1) / 2 thin spacings before thick slice 0."""
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    return np.asarray(thick_origin_mm, dtype=np.float64) - (factor - 1) / 2.0 * (thick_dz_mm / factor) * normal


def thick_origin_mm(thin_origin_mm, thin_dz_mm: float, direction, factor: int) -> np.ndarray:
    """Centre of thick slice 0 simulated from thin rows [0, factor): the inverse of `thin_origin_mm`."""
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    return np.asarray(thin_origin_mm, dtype=np.float64) + (factor - 1) / 2.0 * thin_dz_mm * normal


def align(thin: Grid, thick: Grid, factor: int) -> int:
    """The offset of `thick` on `thin` (thick slice k covers thin rows [offset + k*factor, offset + (k+1)*factor)),
    or AlignmentError saying why they are not a pair with this factor. The offset may be negative or leave
    thick slices without thin rows: `covered_slabs` says which slabs a pair covers."""
    thin_dir = np.asarray(thin.direction, dtype=np.float64).reshape(3, 3)
    thick_dir = np.asarray(thick.direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(thin_dir, thick_dir, atol=DIRECTION_ATOL):
        raise AlignmentError("thick and thin series have different orientations")
    if tuple(thin.shape[1:]) != tuple(thick.shape[1:]) or not np.allclose(
        thin.spacing_mm[1:], thick.spacing_mm[1:], rtol=INPLANE_SPACING_RTOL
    ):
        raise AlignmentError(
            f"thick and thin in-plane grids differ ({tuple(thick.shape[1:])} at {tuple(thick.spacing_mm[1:])} mm vs "
            f"{tuple(thin.shape[1:])} at {tuple(thin.spacing_mm[1:])} mm); resample one onto the other first"
        )
    dz_thin, dy, dx = (float(v) for v in thin.spacing_mm)
    ratio = float(thick.spacing_mm[0]) / dz_thin
    if abs(ratio - factor) > FACTOR_RTOL * factor:
        raise AlignmentError(
            f"slice spacings {float(thick.spacing_mm[0]):.3f} / {dz_thin:.3f} mm (ratio {ratio:.3f}) are not factor "
            f"{factor}"
        )
    delta = np.asarray(thick.origin_mm, dtype=np.float64) - np.asarray(thin.origin_mm, dtype=np.float64)
    shift_x, shift_y = float(delta @ thin_dir[:, 0]), float(delta @ thin_dir[:, 1])
    if abs(shift_x) > INPLANE_SHIFT_PX * dx or abs(shift_y) > INPLANE_SHIFT_PX * dy:
        raise AlignmentError(f"thick and thin series are shifted in-plane by ({shift_x:.2f}, {shift_y:.2f}) mm")
    offset = float(delta @ thin_dir[:, 2]) / dz_thin - (factor - 1) / 2.0
    if abs(offset - round(offset)) > OFFSET_TOL_SLICES:
        raise AlignmentError(
            f"thick slab centres fall {offset:.2f} thin slices from the thin grid (tolerance {OFFSET_TOL_SLICES}); "
            f"a thick slice must be centred on its {factor} thin slices"
        )
    return int(round(offset))


def covered_slabs(thick_depth: int, thin_depth: int, *, factor: int, offset: int) -> tuple[int, int]:
    """Thick slices [k_lo, k_hi) whose whole thin slab [offset + k*factor, offset + (k+1)*factor) exists
    (k_hi == k_lo when none does)."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    k_lo = max(0, -(offset // factor))  # first k with offset + k*factor >= 0
    k_hi = min(thick_depth, (thin_depth - offset) // factor)  # last slab ends inside thin
    return k_lo, max(k_hi, k_lo)


def covered_pair(thick: np.ndarray, thin: np.ndarray, *, factor: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a thick/thin pair to the thick slices whose whole thin slab exists, so that offset becomes 0.

    Returns views `(thick[k_lo:k_hi], thin[offset + k_lo*factor : offset + k_hi*factor])`: the thin view holds
    exactly `factor` rows per thick slice, row k*factor + i being phase i of thick slice k (both may be empty).
    """
    if thick.ndim != 3 or thin.ndim != 3:
        raise ValueError(f"thick and thin must be (D, H, W), got shapes {thick.shape} and {thin.shape}")
    if thick.shape[1:] != thin.shape[1:]:
        raise ValueError(
            f"thick {thick.shape} and thin {thin.shape} must share the in-plane grid (H, W); "
            "rebuild the shards with `ctld-shards build`, which resamples partners onto one grid"
        )
    k_lo, k_hi = covered_slabs(thick.shape[0], thin.shape[0], factor=factor, offset=offset)
    return thick[k_lo:k_hi], thin[offset + k_lo * factor : offset + k_hi * factor]


def grid_problem(direction, spacing_mm) -> tuple[str, str] | None:
    """Why a grid is not the orthogonal, uniformly spaced, right-handed grid ctld works on, as `(reason,
    detail)` with the DICOM planner's reason names, or None when it is. The one rule for DICOM, NIfTI and cache
    volumes (a DICOM plan is built orthonormal and right-handed from its headers, so only its positions can fail:
    `dicom.plan_series` finds tilt and non-uniform steps there).

    Args:
        direction: (3, 3) columns x (W), y (H), z (D, the slice axis), unit length.
        spacing_mm: (dz, dy, dx).

    Reasons: `missing_geometry` (spacing or direction not finite, spacing <= 0), `invalid_orientation` (the
    in-plane axes are not orthonormal), `gantry_tilt` (the slice axis is off the image plane's normal: a tilted
    gantry or a sheared affine), `left_handed` (slices run against the normal x cross y; a reader flips them, see
    `nifti.read_nifti`, so a Volume never holds one).
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    direction = np.asarray(direction, dtype=np.float64)
    if spacing.shape != (3,) or direction.shape != (3, 3) or not (np.isfinite(spacing).all()
                                                                  and np.isfinite(direction).all()):
        return "missing_geometry", f"spacing {spacing.tolist()} mm or direction {direction.tolist()} is not usable"
    if (spacing <= 0).any():
        return "missing_geometry", f"spacing {tuple(round(float(v), 4) for v in spacing)} mm is not positive"
    x_axis, y_axis, z_axis = direction[:, 0], direction[:, 1], direction[:, 2]
    inplane = np.stack([x_axis, y_axis], axis=1)
    if abs(float(np.linalg.norm(z_axis)) - 1.0) > ORTHOGONAL_ATOL:
        return "invalid_orientation", f"the slice axis {z_axis.round(4).tolist()} is not a unit vector"
    if np.abs(inplane.T @ inplane - np.eye(2)).max() > ORTHOGONAL_ATOL:
        angle = math.degrees(math.acos(float(np.clip(x_axis @ y_axis, -1.0, 1.0))))
        return "invalid_orientation", f"the in-plane axes are {angle:.1f} deg apart, not an orthonormal image plane"
    plane_normal = np.cross(x_axis, y_axis)
    cosine = float(plane_normal @ z_axis)
    if abs(abs(cosine) - 1.0) > ORTHOGONAL_ATOL:
        angle = math.degrees(math.acos(min(1.0, abs(cosine))))
        return "gantry_tilt", (f"the slice axis is {angle:.1f} deg off the image plane's normal (gantry tilt or a "
                               "sheared affine); ctld needs an orthogonal grid. Resample the series without tilt first")
    if cosine < 0:
        return "left_handed", "slices run against the image plane's normal (x cross y); flip the slice order"
    return None


def check_thick_input(grid: Grid, *, factor: int, name: str, slice_thickness_mm: float | None = None) -> None:
    """Refuse a thick input no model can handle, naming the series: a grid that is not orthogonal and right-handed
    (`grid_problem`: gantry tilt, shear). Warns when the slice thickness differs from the spacing. (Whether the
    spacing fits the model is the export's training domain's question: `ctld.data.domain.input_differences`.)"""
    problem = grid_problem(grid.direction, grid.spacing_mm)
    if problem is not None:
        raise ValueError(f"{name}: {problem[1]}.")
    dz = float(grid.spacing_mm[0])
    thickness = float(slice_thickness_mm or dz)
    if abs(thickness / dz - 1.0) > 0.1:
        logger.warning(
            "%s: slice thickness %.2f mm differs from the spacing %.2f mm (overlapping or gapped reconstruction); the "
            "model assumes each thick slice averages the %d thin slices it covers", name, thickness, dz, factor
        )


def resampled_inplane_shape(shape_hw: tuple[int, int], pixel_spacing_mm, new_spacing_mm: float) -> tuple[int, int]:
    """(height, width) of an image of `shape_hw` pixels of (dy, dx) mm once `resample_inplane` makes them
    `new_spacing_mm`."""
    dy, dx = pixel_spacing_mm
    return max(1, round(shape_hw[0] * dy / new_spacing_mm)), max(1, round(shape_hw[1] * dx / new_spacing_mm))


def resample_inplane(hu: np.ndarray, spacing_mm, new_spacing_mm: float) -> tuple[np.ndarray, tuple]:
    """Linear in-plane resampling of (D, H, W) HU to square pixels of `new_spacing_mm`; depth untouched. The
    grid keeps voxel (0, 0) where it was (the origin does not move)."""
    from scipy.ndimage import zoom

    dz, dy, dx = spacing_mm
    height, width = resampled_inplane_shape(hu.shape[1:], (dy, dx), new_spacing_mm)
    if (height, width) == hu.shape[1:] and np.allclose((dy, dx), new_spacing_mm, rtol=1e-3):
        return hu, tuple(spacing_mm)
    # grid_mode=False maps corner voxel centres onto each other, so the new spacing is (n_in - 1) / (n_out - 1).
    out = zoom(hu.astype(np.float32), (1.0, height / hu.shape[1], width / hu.shape[2]), order=1, mode="nearest",
               grid_mode=False)  # fmt: skip
    assert out.shape[1:] == (height, width), out.shape
    spacing = (
        dz,
        dy * (hu.shape[1] - 1) / (height - 1) if height > 1 else new_spacing_mm,
        dx * (hu.shape[2] - 1) / (width - 1) if width > 1 else new_spacing_mm,
    )
    return np.rint(out).astype(np.int16), spacing


def resize_inplane(hu: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Linear in-plane resampling of (D, H, W) onto `shape_hw`, corner voxel centres kept (the inverse of
    `resample_inplane` onto the original grid); float32, depth untouched."""
    from scipy.ndimage import zoom

    if tuple(hu.shape[1:]) == tuple(shape_hw):
        return hu.astype(np.float32, copy=False)
    factors = (1.0, shape_hw[0] / hu.shape[1], shape_hw[1] / hu.shape[2])
    out = zoom(hu.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
    assert out.shape[1:] == tuple(shape_hw), out.shape
    return out
