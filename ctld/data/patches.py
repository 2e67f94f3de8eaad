"""Aligned thick/thin patch sampling and augmentation: pure array functions plus thin sample-dict wrappers
(MONAI's array.py / dictionary.py split), and `collate_patches`, which stacks patches into a batch. The loader
(ctld/data/loader.py) streams shards through these.

Alignment (docs/DESIGN.md, Thick/thin alignment): thick slice k covers thin slices [offset + k*f, offset + (k+1)*f).
`covered_pair` (ctld/data/geometry.py) first cuts both volumes to the thick slices whose thin slab lies fully
inside the thin volume, so from then on offset is 0 and thick slice k pairs with thin slices [k*f, (k+1)*f). A patch of
`depth_thick` thick slices from k0 pairs with thin slices [k0*f, (k0 + depth_thick)*f) and the same
in-plane crop; a patch that reaches outside the volume (volumes smaller than a patch) is filled with air.

    thick_patch, thin_patch = extract_patch_pair(thick, thin, factor=5, origin=(k0, y0, x0),
                                                 depth_thick=8, patch_size=192)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from ctld.data.geometry import covered_pair
from ctld.data.transforms import hu_to_model

AIR_HU = -1024  # fill value for padding (docs/DESIGN.md, Intensities: hu_min maps air to -1)
# A voxel counts as foreground above this. Air reads about -1000 +- noise; lung parenchyma about -850 to
# -700, so lung crops count as foreground while the air around the patient does not.
FOREGROUND_HU = -900.0
# In-plane stride for the foreground estimate: every 4th row and column is plenty to tell air from anatomy.
_FOREGROUND_STRIDE = 4

# The 8 in-plane symmetries of a square (dihedral group D4) as (flip_rows, flip_cols, quarter_turns).
DIHEDRAL = tuple((flip_y, flip_x, turns) for flip_y in (False, True) for flip_x in (False, True) for turns in (0, 1))


def crop_with_fill(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = AIR_HU) -> np.ndarray:
    """A copy of `volume[start : start + size]` (per axis) where the parts outside the volume hold `fill`.

    Args:
        volume: (D, H, W) array.
        start: (z, y, x) corner of the window, in voxels; may be negative or reach past the end.
        size: (d, h, w) window size.
    """
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src, dst = [], []
    for axis_start, axis_size, axis_len in zip(start, size, volume.shape, strict=True):
        lo, hi = max(axis_start, 0), min(axis_start + axis_size, axis_len)
        if hi <= lo:
            return out  # the window misses the volume entirely
        src.append(slice(lo, hi))
        dst.append(slice(lo - axis_start, hi - axis_start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def fits_patch(thick_shape: Sequence[int], *, depth_thick: int, patch_size: int) -> bool:
    """Whether a (covered) thick volume of this shape holds a whole patch without padding."""
    depth, height, width = thick_shape
    return depth >= depth_thick and height >= patch_size and width >= patch_size


def draw_origin(
    rng: np.random.Generator, thick_shape: Sequence[int], *, depth_thick: int, patch_size: int
) -> tuple[int, int, int]:
    """Uniform random patch corner (k0, y0, x0) in thick voxels.

    Along an axis shorter than the patch the corner is negative, placing the volume at a random position
    inside the (air-padded) patch.
    """
    corner = []
    for axis_len, patch_len in zip(thick_shape, (depth_thick, patch_size, patch_size), strict=True):
        lo, hi = min(0, axis_len - patch_len), max(0, axis_len - patch_len)
        corner.append(int(rng.integers(lo, hi + 1)))
    return corner[0], corner[1], corner[2]


def extract_patch_pair(
    thick: np.ndarray,
    thin: np.ndarray,
    *,
    factor: int,
    origin: tuple[int, int, int],
    depth_thick: int,
    patch_size: int,
    fill: float = AIR_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one aligned patch pair from a covered pair (offset 0, see `covered_pair`).

    Args:
        thick: (Dk, H, W) HU.
        thin: (Dk * factor, H, W) HU.
        origin: (k0, y0, x0) patch corner in thick voxels.

    Returns:
        thick patch (depth_thick, P, P) and thin patch (depth_thick * factor, P, P), copies in the input dtype.
    """
    if thin.shape[0] != thick.shape[0] * factor:
        raise ValueError(
            f"thin depth {thin.shape[0]} != thick depth {thick.shape[0]} * factor {factor}; "
            "cut the pair with covered_pair() first"
        )
    k0, y0, x0 = origin
    thick_patch = crop_with_fill(thick, (k0, y0, x0), (depth_thick, patch_size, patch_size), fill)
    thin_patch = crop_with_fill(thin, (k0 * factor, y0, x0), (depth_thick * factor, patch_size, patch_size), fill)
    return thick_patch, thin_patch


def foreground_fraction(patch: np.ndarray, threshold_hu: float = FOREGROUND_HU) -> float:
    """Fraction of voxels above `threshold_hu` (estimated on every 4th row and column)."""
    sub = patch[:, ::_FOREGROUND_STRIDE, ::_FOREGROUND_STRIDE]
    return float(np.count_nonzero(sub > threshold_hu)) / max(sub.size, 1)


def dihedral(volume: np.ndarray, flip_y: bool, flip_x: bool, turns: int) -> np.ndarray:
    """One in-plane symmetry of a (D, H, W) array: optional row/column flips, then `turns` quarter turns.

    Depth is never touched, so thick/thin alignment along z is kept. Returns a view (no copy: the patch is
    copied once anyway when the batch is stacked).
    """
    if flip_y:
        volume = volume[:, ::-1, :]
    if flip_x:
        volume = volume[:, :, ::-1]
    if turns % 4:
        volume = np.rot90(volume, k=turns, axes=(1, 2))
    return volume


def augment_pair(
    thick_patch: np.ndarray, thin_patch: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random in-plane symmetry (one of the 8 of a square) applied to both patches."""
    flip_y, flip_x, turns = DIHEDRAL[int(rng.integers(len(DIHEDRAL)))]
    return dihedral(thick_patch, flip_y, flip_x, turns), dihedral(thin_patch, flip_y, flip_x, turns)


def sample_patch_pairs(
    thick: np.ndarray,
    thin: np.ndarray,
    *,
    factor: int,
    offset: int,
    depth_thick: int,
    patch_size: int,
    count: int,
    rng: np.random.Generator,
    augment: bool = False,
    min_foreground_fraction: float = 0.0,
    max_tries: int = 10,
    small_volume: Literal["pad", "skip"] = "pad",
) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]] | None:
    """Draw `count` aligned patch pairs from one thick/thin pair, sharing the cost of decoding it.

    Args:
        thick: (Dk, H, W) HU; thin: (D, H, W) HU on the same in-plane grid.
        factor, offset: the pair's alignment (docs/DESIGN.md, Thick/thin alignment).
        count: patches to draw (K).
        rng: the only source of randomness, so a seeded stream is reproducible.
        augment: apply one random in-plane symmetry per patch, the same on thick and thin.
        min_foreground_fraction: redraw a crop (up to `max_tries` draws) while its thick patch has fewer
            foreground voxels than this; the best draw is kept when none reaches it.
        small_volume: a covered volume smaller than a patch on any axis is padded with air ("pad") or
            skipped ("skip": returns None).

    Returns:
        `count` tuples (thick patch (depth_thick, P, P), thin patch (depth_thick*factor, P, P), origin), where
        origin = (k0, y0, x0) is the corner in the covered pair (before augmentation); None when skipped.
    """
    if count < 1 or max_tries < 1:
        raise ValueError(f"count ({count}) and max_tries ({max_tries}) must be >= 1")
    thick, thin = covered_pair(thick, thin, factor=factor, offset=offset)
    if thick.shape[0] == 0:
        return None  # no thick slice has its thin slab: nothing to learn from, whatever small_volume says
    if small_volume == "skip" and not fits_patch(thick.shape, depth_thick=depth_thick, patch_size=patch_size):
        return None
    pairs = []
    for _ in range(count):
        best = None
        for _ in range(max_tries):
            origin = draw_origin(rng, thick.shape, depth_thick=depth_thick, patch_size=patch_size)
            thick_patch = crop_with_fill(thick, origin, (depth_thick, patch_size, patch_size))
            fraction = foreground_fraction(thick_patch) if min_foreground_fraction > 0 else 1.0
            if best is None or fraction > best[0]:
                best = (fraction, origin)
            if fraction >= min_foreground_fraction:
                break
        thick_patch, thin_patch = extract_patch_pair(
            thick, thin, factor=factor, origin=best[1], depth_thick=depth_thick, patch_size=patch_size
        )
        if augment:
            thick_patch, thin_patch = augment_pair(thick_patch, thin_patch, rng)
        pairs.append((thick_patch, thin_patch, best[1]))
    return pairs


def sample_patch_pairs_d(sample: dict[str, Any], *, rng: np.random.Generator, **kwargs: Any) -> list[dict] | None:
    """Sample-dict wrapper of `sample_patch_pairs` for a decoded shard sample.

    Args:
        sample: {"__key__", "thick": (Dk, H, W), "thin": (D, H, W), "factor", "offset"} (see loader.decode_sample).
        kwargs: the remaining `sample_patch_pairs` arguments (depth_thick, patch_size, count, ...).

    Returns:
        One dict per patch, {"__key__", "thick", "thin", "origin"}, or None when the volume is skipped.
    """
    pairs = sample_patch_pairs(
        sample["thick"], sample["thin"], factor=sample["factor"], offset=sample["offset"], rng=rng, **kwargs
    )
    if pairs is None:
        return None
    return [
        {"__key__": sample["__key__"], "thick": thick, "thin": thin, "origin": origin} for thick, thin, origin in pairs
    ]


def collate_patches(patches: list[dict[str, Any]], *, hu_min: float, hu_max: float) -> dict[str, Any]:
    """Patch dicts (int16 HU) -> {"thick": (B, 1, Dk, P, P), "thin": (B, 1, Dk*f, P, P) float32 in [-1, 1], "key"}."""
    thick = hu_to_model(np.stack([p["thick"] for p in patches]), hu_min, hu_max)
    thin = hu_to_model(np.stack([p["thin"] for p in patches]), hu_min, hu_max)
    return {
        "thick": torch.from_numpy(thick).unsqueeze(1),  # (B, 1, Dk, P, P)
        "thin": torch.from_numpy(thin).unsqueeze(1),  # (B, 1, Dk * factor, P, P)
        "key": [p["__key__"] for p in patches],
    }
