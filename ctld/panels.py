"""PNG comparison panels: one row per view (axial, coronal, sagittal), one column per image plus |error|.

    save_panels("case.png", [("thick", thick_on_thin_grid), ("cubic", cubic), ("ctld", pred), ("target", thin)],
                spacing_mm=(1.0, 0.7, 0.7), direction=volume.direction, error_of="ctld", reference="target")

All images share the thin grid (D, H, W) in HU. Coronal and sagittal cuts are resized to their physical aspect
ratio (slice spacing vs pixel spacing), with the superior end at the top; axial cuts are shown as in a viewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctld.data.transforms import window_to_unit

VIEWS = ("axial", "coronal", "sagittal")
LABEL_HEIGHT = 14


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
    scale = tile / extent[0]
    return tile, max(1, int(round(extent[1] * scale)))


def _hot(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 black-red-yellow-white (a 'hot' colour map), so errors stand out from anatomy."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def save_panels(
    path: str | Path,
    columns: list[tuple[str, np.ndarray]],
    *,
    spacing_mm: tuple[float, float, float],
    direction: np.ndarray | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    error_of: str | None = None,
    reference: str | None = None,
    error_max_hu: float = 200.0,
    tile: int = 256,
) -> Path:
    """Write a PNG with rows axial/coronal/sagittal and the named columns (+ |error_of - reference|).

    Args:
        path: output PNG.
        columns: (label, (D, H, W) HU) pairs, all of one shape, in display order.
        spacing_mm: (dz, dy, dx) of that grid.
        direction: (3, 3) Volume direction; decides whether the slice axis points up (superior) or down.
        window: HU window mapped to black..white.
        error_of, reference: labels of the columns whose absolute difference is shown last, 0..`error_max_hu`.
        tile: width of each image in pixels.
    """
    if not columns:
        raise ValueError("save_panels needs at least one column")
    shape = columns[0][1].shape
    for label, volume in columns:
        if volume.shape != shape:
            raise ValueError(f"panel column {label!r} has shape {volume.shape}, expected {shape}")
    named = dict(columns)
    entries: list[tuple[str, np.ndarray, bool]] = [(label, volume, False) for label, volume in columns]
    if error_of is not None and reference is not None:
        error = np.abs(named[error_of].astype(np.float32) - named[reference].astype(np.float32))
        entries.append((f"|{error_of}-{reference}| 0-{error_max_hu:g} HU", error, True))
    # Slice axis towards the head (LPS +z) at the top, as radiology viewers show coronal/sagittal cuts.
    superior_up = direction is None or float(np.asarray(direction)[2, 2]) >= 0
    sizes = {view: _display_size(view, shape, spacing_mm, tile) for view in VIEWS}
    total_height = sum(LABEL_HEIGHT + sizes[view][1] for view in VIEWS)
    canvas = Image.new("RGB", (tile * len(entries), total_height), "black")
    draw = ImageDraw.Draw(canvas)
    top = 0
    lo, hi = window
    for view in VIEWS:
        index = {"axial": shape[0] // 2, "coronal": shape[1] // 2, "sagittal": shape[2] // 2}[view]
        size = sizes[view]
        for column, (label, volume, is_error) in enumerate(entries):
            cut = _cut(volume, view, index).astype(np.float32)
            if view != "axial" and superior_up:
                cut = cut[::-1]
            if is_error:
                image = Image.fromarray(_hot(cut / error_max_hu), "RGB")
            else:
                image = Image.fromarray((window_to_unit(cut, lo, hi) * 255).astype(np.uint8), "L").convert("RGB")
            canvas.paste(image.resize(size, Image.Resampling.BILINEAR), (column * tile, top + LABEL_HEIGHT))
            draw.text((column * tile + 3, top + 1), f"{label} ({view})" if column == 0 else label, fill="white")
        top += LABEL_HEIGHT + size[1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
