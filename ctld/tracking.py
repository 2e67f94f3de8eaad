"""TensorBoard image panels: what the model produces next to its input, a baseline and the target.

A panel is one grey image per HU window: the top row shows the axial mid-slice of each column, the bottom
row the coronal mid-plane, where interpolation quality shows (a thick series is blocky along depth). Thick
columns are repeated along depth `factor` times so every column of the coronal row has the same height.

    columns = {"thick": thick_hu, "model": model_hu, "cubic": cubic_hu, "target": thin_hu}
    image = make_panel(list(columns.values()), depth_repeats=[factor, 1, 1, 1], window=WINDOWS["soft_tissue"])
    writer.add_image("panels/soft_tissue", image, step, dataformats="HW")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctld.data.transforms import window_to_unit

_GAP_PX = 2  # white separator between columns and rows


def _as_volume(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    while x.ndim > 3:  # (B, C, D, H, W) or (C, D, H, W): take the first volume
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"panel columns must be (D, H, W) volumes, got shape {x.shape}")
    return x


def make_panel(
    columns: Sequence[np.ndarray | torch.Tensor],
    *,
    depth_repeats: Sequence[int],
    window: tuple[float, float],
) -> np.ndarray:
    """One (rows, cols) float image in [0, 1]: axial mid-slices on top, coronal mid-planes below.

    Args:
        columns: HU volumes (D_i, H, W) (or batched; the first item is used), left to right.
        depth_repeats: per column, thin slices per slice (e.g. `factor` for the thick input, 1 for thin ones);
            D_i * depth_repeats[i] must be equal for all columns.
        window: (lo, hi) HU mapped to [0, 1], e.g. `ctld.metrics.WINDOWS["soft_tissue"]`.
    """
    volumes = [_as_volume(c) for c in columns]
    if len(volumes) != len(depth_repeats):
        raise ValueError(f"got {len(volumes)} columns but {len(depth_repeats)} depth_repeats")
    # Bring every column to the thin depth: a thick slice covers `repeat` thin slices.
    volumes = [np.repeat(v, r, axis=0) for v, r in zip(volumes, depth_repeats)]
    shapes = {v.shape for v in volumes}
    if len(shapes) != 1:
        raise ValueError(f"panel columns must have the same thin-depth shape after repeating, got {shapes}")
    depth, height, width = volumes[0].shape
    lo, hi = window
    axial = [window_to_unit(v[depth // 2], lo, hi) for v in volumes]  # (H, W) each
    coronal = [window_to_unit(v[:, height // 2, :], lo, hi) for v in volumes]  # (D, W) each
    top = _hstack(axial)
    bottom = _hstack(coronal)
    gap = np.ones((_GAP_PX, top.shape[1]), dtype=np.float32)
    return np.concatenate([top, gap, bottom], axis=0).astype(np.float32)


def _hstack(images: list[np.ndarray]) -> np.ndarray:
    gap = np.ones((images[0].shape[0], _GAP_PX), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, image in enumerate(images):
        if i:
            parts.append(gap)
        parts.append(image.astype(np.float32))
    return np.concatenate(parts, axis=1)
