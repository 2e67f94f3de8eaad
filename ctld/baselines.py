"""Baseline slice interpolation along z onto ctld's thin grid (docs/DESIGN.md, Geometry convention).

Thin slice m of a thick series with `factor` f sits at thick-index coordinate u = (m + 0.5) / f - 0.5: the f thin
slices of thick slice k are centred on it, `z_k + (i - (f - 1) / 2) * dz / f`. Each method is a fixed (D*f, D)
matrix of weights over the thick slices, so it runs the same on a whole volume and on a window:
- nearest: thin m copies the thick slab that contains it (k = m // f), i.e. what a viewer shows.
- linear: 2-tap linear interpolation between slab centres.
- cubic: 4-tap Keys cubic convolution with a = -0.5 (Catmull-Rom; Keys 1981, the kernel of "bicubic" resizing).
Beyond the first/last slab centre, taps are clamped to the edge slab (replicate), as in torch's `interpolate`.

All three treat a thick slice as a point sample at its slab centre, but a thick slice is a slab average, so they
blur twice (once by the slab, once by the kernel). `SlabFilter` is the slab-aware linear baseline: for each of the
`factor` thin-slice phases inside a slab, `taps` weights over the neighbouring thick slices, fitted by closed-form
least squares on training pairs (`fit_slab_filter`); the fitted taps look like a deconvolution of the slice
profile. It is fitted on the training split, stored with the export, and never fitted on a case being scored.

    thin = interpolate_z(thick_hu, factor=5, method="cubic")       # (D, H, W) -> (D*5, H, W) float32
    slab = fit_slab_filter(pairs, factor=5)                         # pairs of (thick, thin on its thin grid)
    thin = slab.apply(thick_hu)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

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


def apply_z_matrix(thick, matrix: np.ndarray):
    """thin = matrix @ thick along the slice axis: numpy (D, H, W) -> float32 (M, H, W); a tensor (..., D, H, W) ->
    (..., M, H, W) of the input's dtype and device."""
    if isinstance(thick, torch.Tensor):
        # In fp32 even for bf16 input: bf16 weights would no longer sum to 1 (mean HU drifts).
        weights = torch.from_numpy(np.asarray(matrix)).to(thick.device, torch.float32)
        return torch.einsum("md,...dhw->...mhw", weights, thick.float()).to(thick.dtype)
    thick = np.asarray(thick)
    if thick.ndim != 3:
        raise ValueError(f"z-interpolation needs a (D, H, W) volume, got shape {thick.shape}")
    depth, height, width = thick.shape
    # One matrix product over flattened rows; float32 keeps a 60x512x512 -> 300-slice volume at ~0.3 GB.
    flat = thick.reshape(depth, height * width).astype(np.float32, copy=False)
    return (np.asarray(matrix, dtype=np.float32) @ flat).reshape(matrix.shape[0], height, width)


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
    return apply_z_matrix(thick, interpolation_matrix(int(thick.shape[-3]), factor, method))


# --------------------------------------------------------------------------------------------------------------
# The slab-aware linear filter


@dataclass(frozen=True)
class SlabFilter:
    """Per-phase linear z-filter: thin slice k*factor + i = sum_j weights[i, j] * thick[k + j - taps // 2]
    (edge slices replicated). Each row of `weights` sums to 1, so mean HU is kept and the filter gives the same
    result in HU and in model units."""

    weights: np.ndarray  # (factor, taps) float64

    @property
    def factor(self) -> int:
        return int(self.weights.shape[0])

    @property
    def taps(self) -> int:
        return int(self.weights.shape[1])

    def matrix(self, depth: int) -> np.ndarray:
        """(depth*factor, depth) float64 weights, like `interpolation_matrix`."""
        factor, taps = self.weights.shape
        matrix = np.zeros((depth * factor, depth))
        for k in range(depth):
            for i in range(factor):
                for j in range(taps):
                    matrix[k * factor + i, min(max(k + j - taps // 2, 0), depth - 1)] += self.weights[i, j]
        return matrix

    def apply(self, thick):
        """Thick (D, H, W) numpy or (..., D, H, W) tensor -> the thin grid, as `interpolate_z`."""
        return apply_z_matrix(thick, self._cached_matrix(int(thick.shape[-3])))

    def _cached_matrix(self, depth: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_matrices", {})  # frozen dataclass: a private cache, not a field
        if depth not in cache:
            cache[depth] = self.matrix(depth)
        return cache[depth]

    def to_json(self) -> dict[str, Any]:
        return {"factor": self.factor, "taps": self.taps, "weights": self.weights.round(8).tolist()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SlabFilter:
        weights = np.asarray(doc["weights"], dtype=np.float64)
        if weights.ndim != 2 or weights.shape != (int(doc["factor"]), int(doc["taps"])):
            raise ValueError(f"slab filter weights of shape {weights.shape} do not match factor {doc['factor']} and "
                             f"taps {doc['taps']}")
        return cls(weights)


def fit_slab_filter(pairs: Iterable[tuple[np.ndarray, np.ndarray]], factor: int, taps: int = 5,
                    ridge: float = 1e-6) -> SlabFilter:
    """Least-squares taps per thin-slice phase, each row constrained to sum to 1, in closed form.

    Args:
        pairs: (thick (D, H, W), thin (D*factor, H, W)) HU on the thick series' thin grid (thin row k*factor + i is
            phase i of thick slice k). Rows whose taps would reach past the volume are left out of the fit.
        factor: thin slices per thick slice.
        taps: thick slices per output (odd: centred on the covering slice).
        ridge: Tikhonov term relative to the mean diagonal, for flat data.

    Returns:
        The fitted `SlabFilter`.
    """
    if taps < 1 or taps % 2 == 0:
        raise ValueError(f"slab filter taps must be odd and >= 1, got {taps}")
    half = taps // 2
    gram = np.zeros((factor, taps, taps))
    rhs = np.zeros((factor, taps))
    count = volumes = deepest = 0
    for thick, thin in pairs:
        thick = np.asarray(thick, dtype=np.float64)
        volumes, deepest = volumes + 1, max(deepest, thick.shape[0])
        if thin.shape != (thick.shape[0] * factor, *thick.shape[1:]):
            raise ValueError(f"thin {thin.shape} is not on the thin grid of thick {thick.shape} x factor {factor}")
        flat = thick.reshape(thick.shape[0], -1)
        for k in range(half, thick.shape[0] - half):
            window = flat[k - half : k + half + 1]  # (taps, H*W)
            gram += window @ window.T
            target = np.asarray(thin[k * factor : (k + 1) * factor], dtype=np.float64).reshape(factor, -1)
            rhs += target @ window.T
            count += 1
    if count == 0:
        # Say which setting to change: a small-volume set (a CPU smoke run) fits with fewer taps.
        fits = max(1, 2 * ((deepest - 1) // 2) + 1) if deepest else 1
        raise ValueError(
            f"no thick slice with {half} neighbours on each side to fit the slab filter on: the {volumes} training "
            f"volume(s) read have at most {deepest} thick slices, {taps} taps need {taps}. Pass "
            f"--diffusion.slab_taps={fits} (odd, <= the thick depth), or build shards of longer series")
    weights = np.zeros((factor, taps))
    ones = np.ones(taps)
    for i in range(factor):
        g = gram[i] + ridge * np.trace(gram[i]) / taps * np.eye(taps)
        # Minimise w'Gw - 2b'w subject to sum(w) = 1 (Lagrange): the KKT system.
        kkt = np.block([[g, ones[:, None]], [ones[None, :], np.zeros((1, 1))]])
        weights[i] = np.linalg.solve(kkt, np.concatenate([rhs[i], [1.0]]))[:taps]
    return SlabFilter(weights)
