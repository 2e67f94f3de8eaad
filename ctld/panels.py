"""Comparison panels, the one renderer of ctld's pictures: evaluation PNGs, the demo's coronal cut and the
trainer's TensorBoard images.

    save_panels("case.png", [("thick", thick_on_thin_grid), ("cubic", cubic), ("ctld", pred), ("target", thin)],
                spacing_mm=(1.0, 0.7, 0.7), direction=volume.direction, error_of="ctld", reference="target")
    image = render_panel(columns, spacing_mm=(1, 1, 1), views=("axial", "coronal"), windows=("soft_tissue",))

Columns share the thin grid (D, H, W) in HU (repeat a thick series `factor` times along D first). One row per
(HU window, view), one column per image plus |error_of - reference| in a hot colour map. Coronal and sagittal
cuts are resized to their physical aspect (slice spacing vs pixel spacing) with the superior end at the top, as
radiology viewers show them; axial cuts are shown as in a viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctld.data.transforms import HU_WINDOWS, window_to_unit

VIEWS = ("axial", "coronal", "sagittal")
LABEL_HEIGHT_PX = 14
ERROR_MAX_HU = 200.0  # |error| shown from black (0) to white (this many HU)


def _cut(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    if view == "axial":
        return volume[index]
    if view == "coronal":
        return volume[:, index, :]
    return volume[:, :, index]


def _display_size(view: str, shape: tuple[int, int, int], spacing_mm, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a view's tile, keeping physical proportions, width scaled to `tile`."""
    depth, height, width = shape
    dz, dy, dx = spacing_mm
    extent = {  # (width mm, height mm) of each cut
        "axial": (width * dx, height * dy),
        "coronal": (width * dx, depth * dz),
        "sagittal": (height * dy, depth * dz),
    }[view]
    return tile, max(1, int(round(extent[1] * tile / extent[0])))


def _hot(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 black-red-yellow-white (a 'hot' colour map), so errors stand out from anatomy."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def render_panel(
    columns: Sequence[tuple[str, np.ndarray]],
    *,
    spacing_mm: Sequence[float],
    direction: np.ndarray | None = None,
    views: Sequence[str] = VIEWS,
    windows: Sequence[str | tuple[float, float]] = ("soft_tissue",),
    index: dict[str, int] | None = None,
    error_of: str | None = None,
    reference: str | None = None,
    tile: int = 256,
) -> np.ndarray:
    """An (H, W, 3) uint8 image: for each HU window and view a row, for each column (and the error) a tile.

    Args:
        columns: (label, (D, H, W) HU) pairs, all of one shape, in display order.
        spacing_mm: (dz, dy, dx) of that grid.
        direction: (3, 3) Volume direction; decides whether the slice axis points up (superior) or down.
        views: "axial", "coronal", "sagittal", top to bottom.
        windows: names in `HU_WINDOWS` or (lo, hi) HU.
        index: the cut of each view (default: the middle of the volume).
        error_of, reference: labels of the columns whose absolute difference is shown last.
        tile: width of each image in pixels.
    """
    if not columns:
        raise ValueError("a panel needs at least one column")
    shape = tuple(np.shape(columns[0][1]))
    for label, volume in columns:
        if np.shape(volume) != shape or len(shape) != 3:
            raise ValueError(f"panel column {label!r} has shape {np.shape(volume)}, expected one (D, H, W) {shape}")
    entries = [(label, np.asarray(volume, dtype=np.float32), False) for label, volume in columns]
    if error_of is not None and reference is not None:
        named = dict(columns)
        error = np.abs(np.asarray(named[error_of], np.float32) - np.asarray(named[reference], np.float32))
        entries.append((f"|{error_of}-{reference}| 0-{ERROR_MAX_HU:g} HU", error, True))
    superior_up = direction is None or float(np.asarray(direction)[2, 2]) >= 0  # LPS +z (head) at the top
    cut_at = {"axial": shape[0] // 2, "coronal": shape[1] // 2, "sagittal": shape[2] // 2} | (index or {})
    rows = [(HU_WINDOWS[w] if isinstance(w, str) else tuple(w), view) for w in windows for view in views]
    sizes = {view: _display_size(view, shape, spacing_mm, tile) for view in views}
    canvas = Image.new("RGB", (tile * len(entries), sum(LABEL_HEIGHT_PX + sizes[v][1] for _, v in rows)), "black")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (lo, hi), view in rows:
        for column, (label, volume, is_error) in enumerate(entries):
            cut = _cut(volume, view, cut_at[view])
            if view != "axial" and superior_up:
                cut = cut[::-1]
            if is_error:
                image = Image.fromarray(_hot(cut / ERROR_MAX_HU), "RGB")
            else:
                image = Image.fromarray((window_to_unit(cut, lo, hi) * 255).astype(np.uint8), "L").convert("RGB")
            canvas.paste(image.resize(sizes[view], Image.Resampling.BILINEAR), (column * tile, top + LABEL_HEIGHT_PX))
            text = f"{label} ({view}, {lo:g}..{hi:g} HU)" if column == 0 else label
            draw.text((column * tile + 3, top + 1), text, fill="white")
        top += LABEL_HEIGHT_PX + sizes[view][1]
    return np.asarray(canvas)


def save_panels(path: str | Path, columns: Sequence[tuple[str, np.ndarray]], **kwargs) -> Path:
    """`render_panel(columns, **kwargs)` written as a PNG (temporary name, then renamed)."""
    image = Image.fromarray(render_panel(columns, **kwargs), "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path
