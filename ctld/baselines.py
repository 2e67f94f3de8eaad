"""Baseline slice interpolation along z onto ctld's thin grid (DESIGN.md, Geometry convention).

Thin slice m of a thick series with `factor` f sits at thick-index coordinate u = (m + 0.5) / f - 0.5: the f thin
slices of thick slice k are centred on it, `z_k + (i - (f - 1) / 2) * dz / f`. Each method is a fixed (D*f, D)
matrix of weights over the thick slices, so it runs the same on a whole volume and on a window:
- nearest: thin m copies the thick slab that contains it (k = m // f), i.e. what a viewer shows.
- linear: 2-tap linear interpolation between slab centres.
- cubic: 4-tap Keys cubic convolution with a = -0.5 (Catmull-Rom; Keys 1981, the kernel of "bicubic" resizing).
Beyond the first/last slab centre, taps are clamped to the edge slab (replicate), as in torch's `interpolate`.

    thin = interpolate_z(thick_hu, factor=5, method="cubic")       # (D, H, W) -> (D*5, H, W) float32
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

Method = Literal["nearest", "linear", "cubic"]
METHODS: tuple[str, ...] = ("nearest", "linear", "cubic")
CUBIC_A = -0.5  # Keys' parameter; -0.5 gives third-order accuracy (Keys 1981, IEEE TASSP 29(6))


def _cubic_kernel(x: np.ndarray) -> np.ndarray:
    a = CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=64)
def interpolation_matrix(depth: int, factor: int, method: str) -> np.ndarray:
    """(depth*factor, depth) float64 weights: thin = matrix @ thick along z. Rows sum to 1."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {list(METHODS)}")
    if depth < 1 or factor < 1:
        raise ValueError(f"need depth >= 1 and factor >= 1, got depth={depth}, factor={factor}")
    thin = np.arange(depth * factor)
    matrix = np.zeros((depth * factor, depth))
    if method == "nearest":
        matrix[thin, thin // factor] = 1.0
        return matrix
    u = (thin + 0.5) / factor - 0.5  # thick-index coordinate of each thin slice
    base = np.floor(u).astype(int)
    if method == "linear":
        taps = [(base, 1.0 - (u - base)), (base + 1, u - base)]
    else:
        taps = [(base + o, _cubic_kernel(u - (base + o))) for o in (-1, 0, 1, 2)]
    for index, weight in taps:
        np.add.at(matrix, (thin, np.clip(index, 0, depth - 1)), weight)
    return matrix


def interpolate_z(thick, factor: int, method: str):
    """Interpolate along the slice axis onto the thin grid.

    Args:
        thick: numpy (D, H, W) HU, or a torch tensor (..., D, H, W) (e.g. a (B, 1, D, P, P) window batch).
        factor: thin slices per thick slice.
        method: "nearest" | "linear" | "cubic".

    Returns:
        float32 (D*factor, H, W) numpy for numpy input; a tensor (..., D*factor, H, W) of the input's dtype and
        device for tensor input.
    """
    if isinstance(thick, torch.Tensor):
        depth = thick.shape[-3]
        matrix = torch.from_numpy(interpolation_matrix(depth, factor, method)).to(thick.device, thick.dtype)
        return torch.einsum("md,...dhw->...mhw", matrix, thick)
    thick = np.asarray(thick)
    if thick.ndim != 3:
        raise ValueError(f"interpolate_z needs a (D, H, W) volume, got shape {thick.shape}")
    depth, height, width = thick.shape
    matrix = interpolation_matrix(depth, factor, method).astype(np.float32)
    # One matrix product over flattened rows; float32 keeps a 60x512x512 -> 300-slice volume at ~0.3 GB.
    flat = thick.reshape(depth, height * width).astype(np.float32, copy=False)
    return (matrix @ flat).reshape(depth * factor, height, width)
