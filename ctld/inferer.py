"""The sliding-window inferer: a whole thick volume through a window predictor, blended into a thin volume.

    thin_hu = interpolate_volume(thick_hu, predictor, factor=5, depth_thick=8, patch_size=192, hu_range=(-1024, 3071))

`interpolate_volume` works in the spirit of MONAI's SlidingWindowInferer; what runs inside a window lives in
ctld/predictors.py, reading and writing series in ctld/series_io.py, the CLI in ctld/inference.py.

- depth: windows of `depth_thick` thick slices. The `depth_context` slices at each end of a window are context
  only (their output is dropped), so every thin slice comes from a window that sees `depth_context` thick slices
  on both sides; the volume is padded at its ends by replicating the edge slice, so the first and last slices
  get the same context. Neighbouring windows share `depth_overlap` contributing thick slices, blended.
- in-plane: tiles of `patch_size` pixels overlapping by `inplane_overlap` of a tile; images smaller than a tile
  are padded with air (-1024 HU).
- blending: in-plane, Gaussian weights (sigma = 1/8 of the tile, as MONAI) that favour tile centres; in depth,
  a linear cross-fade over the `depth_overlap` shared slices (a Gaussian would jump from one window to the next
  within a slice or two of a short overlap). The windows form a grid, so the normaliser is separable (depth
  profile x in-plane map) and costs no full volume.
- memory: the output volume is accumulated in place, windows are made batch by batch; nothing else scales
  with the series length.
- window size: a model without per-sample statistics (norm_type "layer", no attention) is fully convolutional, so
  `resolve_window` gives it windows far larger than its training patch (whole slices up to 512 pixels, up to 32
  thick slices): fewer windows, fewer edges, less context recomputed. A GroupNorm or attention model keeps its
  training patch. Windows start in phase with the model's strides (`stride_periods`), since a strided network is
  shift-equivariant only by multiples of its strides.
- HU beyond the model's window: the model sees and returns [hu_min, hu_max]. Where the linear interpolation of the
  input lies outside that window (padding such as -3024 or -2000, metal, dense contrast), the thin series carries
  that interpolation instead: the model knows nothing there, padding stays exactly the padding value viewers key
  on, and MAE in HU keeps its meaning. Linear, not cubic: it never overshoots, so it invents no new extremes.
- `grid_shift` moves the window grid against the image (`ctld-eval --tiling_check`): a tiling-invariant model
  gives the same thin series either way.
With `predict_fn` = per-window cubic interpolation, the result equals cubic interpolation of the whole volume
(tests/test_inference.py), which is what makes the stitching trustworthy for the diffusion model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ctld.data.transforms import hu_to_model, model_to_hu

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
# resolve_window: the largest in-plane tile and window depth (thick slices) a fully convolutional model gets. A
# 32 x 512 x 512 window of the demo's model peaks near 7 GB on a CPU; larger windows only cost memory.
AUTO_TILE_MAX = 512
AUTO_WINDOW_DEPTH_MAX = 32
# (B, 1, depth, P, P) float32 window batch -> (B, 1, depth * factor, P, P), in model units or HU (see hu_range).
# A predictor with a `prior_fn` attribute is also given the matching windows of its prior (B, 1, depth * factor,
# P, P) as a second argument: the prior is computed once on the whole (padded) volume, so a window's edge slices
# get the same filter taps as its interior.
PredictFn = Callable[..., torch.Tensor]


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, length) with the last window flush with the end (length >= window)."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def gaussian_weights(length: int, sigma_scale: float = 0.125) -> np.ndarray:
    """1D Gaussian blending weights centred on the extent, min-clamped so no pixel gets weight 0 (MONAI)."""
    centre = (length - 1) / 2.0
    sigma = max(length * sigma_scale, 1e-3)
    weights = np.exp(-0.5 * ((np.arange(length) - centre) / sigma) ** 2)
    weights = weights / weights.max()
    return np.maximum(weights, 1e-4).astype(np.float32)


def crossfade_weights(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, linear ramps over `overlap` samples at both ends: neighbours that share `overlap` samples
    cross-fade linearly (their weights sum to 1 there), so no seam appears even when the overlap is a few slices,
    where a Gaussian would switch from one window to the next within one or two slices."""
    ramp = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)) / (overlap + 1.0)
    return np.minimum(ramp, 1.0).astype(np.float32)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows go; everything in padded coordinates unless named `_out`."""

    depth: int  # thick slices of the input
    height: int
    width: int
    factor: int
    depth_thick: int
    depth_context: int
    depth_overlap: int
    patch_size: int
    pad_depth_start: int  # replicated slices before the volume: `depth_context` plus the grid's depth shift
    pad_depth_end: int  # replicated slices after the volume: `depth_context`, plus fill for short volumes and phase
    pad_y: int  # air rows added before the image (in-plane centring of small images, plus the grid's shift)
    pad_x: int
    padded_shape: tuple[int, int, int]
    depth_starts: tuple[int, ...]
    y_starts: tuple[int, ...]
    x_starts: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return len(self.depth_starts) * len(self.y_starts) * len(self.x_starts)

    @property
    def half_window_shift(self) -> tuple[int, int, int]:
        """The `grid_shift` of the tiling check: half a window in depth and in-plane."""
        return max(1, self.depth_thick // 2), self.patch_size // 2, self.patch_size // 2


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_windows(
    shape: tuple[int, int, int],
    *,
    factor: int,
    depth_thick: int,
    patch_size: int,
    depth_context: int,
    depth_overlap: int,
    inplane_overlap: float,
    grid_shift: tuple[int, int, int] = (0, 0, 0),
    depth_period: int = 1,
    inplane_period: int = 1,
) -> WindowPlan:
    """Lay out the depth windows and in-plane tiles for a thick volume of `shape` (D, H, W).

    `grid_shift` (thick slices, rows, columns) moves the whole grid back against the volume by that much (more
    padding before it). Every window starts a multiple of `depth_period` thick slices and `inplane_period` pixels
    from the volume's first voxel: a model with strided layers is shift-equivariant only by multiples of its
    strides, so windows on another phase of the stride grid would give other values (bands at window borders).
    Padding at the start is rounded up (and strides down) to keep that phase, whatever the shift.
    """
    depth, height, width = shape
    if min(shape) < 1:
        raise ValueError(f"empty volume of shape {shape}")
    if factor < 1 or depth_thick < 1 or patch_size < 1:
        raise ValueError(f"factor, depth_thick and patch_size must be >= 1, got {factor}, {depth_thick}, {patch_size}")
    if depth_period < 1 or inplane_period < 1:
        raise ValueError(f"depth_period and inplane_period must be >= 1, got {depth_period}, {inplane_period}")
    depth_stride = depth_thick - 2 * depth_context - depth_overlap
    if depth_context < 0 or depth_overlap < 0 or depth_stride < 1:
        raise ValueError(
            f"depth windows of {depth_thick} thick slices cannot keep {depth_context} context slices at each end "
            f"and share {depth_overlap} with the next window (need depth_thick - 2*depth_context - depth_overlap "
            f">= 1, got {depth_stride}); lower infer.depth_context or infer.depth_overlap"
        )
    if depth_stride < depth_period:
        raise ValueError(
            f"depth windows of {depth_thick} thick slices advance by {depth_stride}, less than the model's depth "
            f"stride period of {depth_period} thick slices; use deeper windows (infer.window_depth) or less "
            "context / overlap"
        )
    if not 0.0 <= inplane_overlap < 1.0:
        raise ValueError(f"inplane_overlap must be in [0, 1), got {inplane_overlap}")
    shift_d, shift_y, shift_x = grid_shift
    if min(grid_shift) < 0:
        raise ValueError(f"grid_shift must be >= 0, got {grid_shift}")
    depth_stride -= depth_stride % depth_period
    pad_depth_start = _round_up(depth_context + shift_d, depth_period)
    padded_depth = max(pad_depth_start + depth + depth_context, depth_thick)
    padded_depth += -(padded_depth - depth_thick) % depth_period  # the last window, flush with the end, in phase
    tile_stride = max(1, int(round(patch_size * (1.0 - inplane_overlap))))
    tile_stride = max(inplane_period, tile_stride - tile_stride % inplane_period)

    def inplane(size: int, shift: int) -> tuple[int, int]:
        """(air before the image, padded size): small images centred in a tile, in phase with the strides."""
        before = _round_up(shift + max(0, patch_size - size - shift) // 2, inplane_period)
        padded = max(before + size, patch_size)
        return before, padded + (-(padded - patch_size) % inplane_period)

    pad_y, padded_height = inplane(height, shift_y)
    pad_x, padded_width = inplane(width, shift_x)
    return WindowPlan(
        depth=depth,
        height=height,
        width=width,
        factor=factor,
        depth_thick=depth_thick,
        depth_context=depth_context,
        depth_overlap=depth_overlap,
        patch_size=patch_size,
        pad_depth_start=pad_depth_start,
        pad_depth_end=padded_depth - depth - pad_depth_start,
        pad_y=pad_y,
        pad_x=pad_x,
        padded_shape=(padded_depth, padded_height, padded_width),
        depth_starts=tuple(_starts(padded_depth, depth_thick, depth_stride)),
        y_starts=tuple(_starts(padded_height, patch_size, tile_stride)),
        x_starts=tuple(_starts(padded_width, patch_size, tile_stride)),
    )


def _pad(thick_hu: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Replicate the edge slices along depth (context for the end slices); air around small images."""
    _, padded_height, padded_width = plan.padded_shape
    pad_y_end = padded_height - plan.height - plan.pad_y
    pad_x_end = padded_width - plan.width - plan.pad_x
    out = np.pad(thick_hu, ((plan.pad_depth_start, plan.pad_depth_end), (0, 0), (0, 0)), mode="edge")
    if plan.pad_y or pad_y_end or plan.pad_x or pad_x_end:
        out = np.pad(out, ((0, 0), (plan.pad_y, pad_y_end), (plan.pad_x, pad_x_end)), constant_values=AIR_HU)
    return out


def interpolate_volume(
    thick_hu: np.ndarray,
    predict_fn: PredictFn,
    *,
    factor: int,
    depth_thick: int,
    patch_size: int,
    hu_range: tuple[float, float] | None,
    depth_context: int = 2,
    depth_overlap: int = 1,
    inplane_overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    grid_shift: tuple[int, int, int] = (0, 0, 0),
    window_depth: int = 0,
    tile_size: int = 0,
    keep_beyond: bool = True,
) -> np.ndarray:
    """Thin volume from a thick one by sliding `predict_fn` over windows and blending.

    Args:
        thick_hu: (D, H, W) thick HU, D in increasing position along the slice normal.
        predict_fn: (B, 1, depth_thick, P, P) float32 on `device` -> (B, 1, depth_thick * factor, P, P); with a
            `prior_fn` attribute (whole padded thick volume -> its thin-grid prior) it also gets the prior's windows.
        factor: thin slices per thick slice.
        depth_thick: the model's training depth in thick slices (a window's depth unless `window_depth` says).
        patch_size: the model's training patch edge in pixels (the tile edge unless `tile_size` says).
        hu_range: (hu_min, hu_max): windows go to `predict_fn` in model units [-1, 1] (`hu_to_model`) and its
            output is mapped back with `model_to_hu`; None: `predict_fn` works in HU directly.
        depth_context: thick slices at each window end that are context only.
        depth_overlap: contributing thick slices shared by neighbouring windows (blended).
        inplane_overlap: fraction of a tile shared with its neighbour.
        batch_size: windows per `predict_fn` call.
        progress: a progress bar; None = only when stderr is a terminal (redirected logs get no bar updates).
        grid_shift: (thick slices, rows, columns) by which the window grid is moved against the volume.
        window_depth, tile_size: window depth (thick slices) and tile edge (pixels); 0 = `resolve_window`'s choice.
        The depth context and overlap are shrunk to fit the window (`fit_depth_windows`).
        keep_beyond: with `hu_range`, voxels whose linear interpolation lies outside it take that interpolation
            (`keep_beyond_window`); off to measure a model alone (a VAE's reconstruction ceiling).

    Returns:
        (D * factor, H, W) float32 thin HU on the grid of docs/DESIGN.md (thin slice m of slab k = m // factor); with
        `hu_range`, voxels whose linear interpolation lies outside it carry that interpolation (module docstring).
    """
    thick_hu = np.asarray(thick_hu)
    if thick_hu.ndim != 3:
        raise ValueError(f"interpolate_volume needs a (D, H, W) thick volume, got shape {thick_hu.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan, batch_size = plan_inference(
        predict_fn, thick_hu.shape, factor=factor, depth_thick=depth_thick, patch_size=patch_size,
        depth_context=depth_context, depth_overlap=depth_overlap, inplane_overlap=inplane_overlap,
        batch_size=batch_size, window_depth=window_depth, tile_size=tile_size, grid_shift=grid_shift)
    depth_thick, patch_size = plan.depth_thick, plan.patch_size
    depth_context, depth_overlap = plan.depth_context, plan.depth_overlap
    padded = _pad(thick_hu, plan)
    prior_fn = getattr(predict_fn, "prior_fn", None)
    prior_volume = None
    if prior_fn is not None:  # (D_pad * factor, H_pad, W_pad), in the predictor's units
        whole = hu_to_model(padded, *hu_range) if hu_range is not None else padded.astype(np.float32)
        prior_volume = np.asarray(prior_fn(whole), dtype=np.float32)
    thin_depth = plan.depth * factor
    # Accumulate where the model runs: on a GPU this avoids a host round trip per window (the whole thin volume,
    # 300x512x512 float32 = 0.3 GB, is small next to the models' activations).
    out = torch.zeros((thin_depth, plan.height, plan.width), dtype=torch.float32, device=device)

    # Each window contributes thin slices [context*f, (depth_thick - context)*f) of its output.
    keep_lo, keep_hi = depth_context * factor, (depth_thick - depth_context) * factor
    depth_weights = torch.from_numpy(crossfade_weights(keep_hi - keep_lo, depth_overlap * factor))
    tile_weights_1d = gaussian_weights(patch_size)
    tile_weights = torch.from_numpy(np.outer(tile_weights_1d, tile_weights_1d))
    depth_weights_dev, tile_weights_dev = depth_weights.to(device), tile_weights.to(device)

    # Separable normaliser: the windows form a grid (depth starts x tile starts).
    depth_norm = torch.zeros(thin_depth, dtype=torch.float64)
    for start in plan.depth_starts:
        lo, hi, src_lo, _ = _depth_span(start, plan, keep_lo, keep_hi)
        if hi > lo:
            depth_norm[lo:hi] += depth_weights[src_lo : src_lo + hi - lo].double()
    plane_norm = torch.zeros(plan.padded_shape[1:], dtype=torch.float64)
    for y0 in plan.y_starts:
        for x0 in plan.x_starts:
            plane_norm[y0 : y0 + patch_size, x0 : x0 + patch_size] += tile_weights.double()
    plane_norm = plane_norm[plan.pad_y : plan.pad_y + plan.height, plan.pad_x : plan.pad_x + plan.width]
    assert bool((depth_norm > 0).all()) and bool((plane_norm > 0).all()), "windows leave a gap"

    windows = [(d0, y0, x0) for d0 in plan.depth_starts for y0 in plan.y_starts for x0 in plan.x_starts]
    logger.info(
        "%d thick slices %dx%d -> %d thin: %d depth windows x %d tiles = %d windows, batch %d",
        plan.depth, plan.height, plan.width, thin_depth, len(plan.depth_starts),
        len(plan.y_starts) * len(plan.x_starts), len(windows), batch_size,
    )
    disable = None if progress is None else not progress  # tqdm: None = off unless stderr is a terminal
    with tqdm(total=len(windows), desc="windows", unit="win", disable=disable) as bar:
        for batch_windows in _batches(windows, batch_size):
            batch = np.stack(
                [padded[d0 : d0 + depth_thick, y0 : y0 + patch_size, x0 : x0 + patch_size] for d0, y0, x0 in
                 batch_windows]
            )[:, None]  # (B, 1, depth_thick, P, P)
            thick = torch.from_numpy(batch.astype(np.float32)).to(device)
            if hu_range is not None:
                thick = hu_to_model(thick, *hu_range)
            with torch.no_grad():
                if prior_volume is None:
                    pred = predict_fn(thick)
                else:
                    prior = np.stack([prior_volume[d0 * factor : (d0 + depth_thick) * factor, y0 : y0 + patch_size,
                                                   x0 : x0 + patch_size] for d0, y0, x0 in batch_windows])[:, None]
                    pred = predict_fn(thick, torch.from_numpy(prior).to(device))
            expected = (len(batch_windows), 1, depth_thick * factor, patch_size, patch_size)
            if tuple(pred.shape) != expected:
                raise RuntimeError(f"predict_fn returned shape {tuple(pred.shape)}, expected {expected}")
            pred = pred.float().to(device)
            if hu_range is not None:
                pred = model_to_hu(pred, *hu_range)
            for (d0, y0, x0), window in zip(batch_windows, pred[:, 0], strict=True):
                _accumulate(out, window, (d0, y0, x0), plan, keep_lo, keep_hi, depth_weights_dev, tile_weights_dev)
            bar.update(len(batch_windows))
    out /= depth_norm.float().to(device)[:, None, None]
    out /= plane_norm.float().to(device)[None]
    thin = out.cpu().numpy()
    if hu_range is not None and keep_beyond:
        keep_beyond_window(thin, thick_hu, factor, hu_range)
    return thin


def plan_inference(predict_fn: PredictFn, shape: tuple[int, int, int], *, factor: int, depth_thick: int,
                   patch_size: int, depth_context: int, depth_overlap: int, inplane_overlap: float, batch_size: int,
                   window_depth: int = 0, tile_size: int = 0, grid_shift: tuple[int, int, int] = (0, 0, 0)
                   ) -> tuple[WindowPlan, int]:
    """The windows `interpolate_volume` runs `predict_fn` on for a thick volume of `shape`, and its batch size: the
    window size (`resolve_window`), the stride phase (`stride_periods`) and the context and overlap that fit
    (`fit_depth_windows`)."""
    depth_thick, patch_size, batch_size = resolve_window(
        predict_fn, shape, depth_thick=depth_thick, patch_size=patch_size, batch_size=batch_size,
        depth_context=depth_context, depth_overlap=depth_overlap, window_depth=window_depth, tile_size=tile_size)
    depth_period, inplane_period = stride_periods(predict_fn, factor)
    depth_context, depth_overlap, depth_period = fit_depth_windows(depth_thick, depth_context, depth_overlap,
                                                                   depth_period)
    plan = plan_windows(shape, factor=factor, depth_thick=depth_thick, patch_size=patch_size,
                        depth_context=depth_context, depth_overlap=depth_overlap, inplane_overlap=inplane_overlap,
                        grid_shift=grid_shift, depth_period=depth_period, inplane_period=inplane_period)
    return plan, batch_size


def keep_beyond_window(thin_hu: np.ndarray, thick_hu: np.ndarray, factor: int, hu_range: tuple[float, float]) -> None:
    """In place: where the linear interpolation of `thick_hu` lies outside `hu_range` (the model's window), `thin_hu`
    takes that interpolation (module docstring: padding, metal and dense contrast are kept, never clipped)."""
    from ctld.baselines import interpolate_z

    hu_min, hu_max = hu_range
    if float(thick_hu.min()) >= hu_min and float(thick_hu.max()) <= hu_max:
        return  # linear interpolation stays within the input's range
    linear = interpolate_z(np.asarray(thick_hu, dtype=np.float32), factor, "linear")
    beyond = (linear < hu_min) | (linear > hu_max)
    thin_hu[beyond] = linear[beyond]


def stride_periods(predict_fn: PredictFn, factor: int) -> tuple[int, int]:
    """(thick slices, pixels) by which a predictor's output shifts with its input: its `tile_multiple` in-plane; in
    depth its `depth_multiple` thin slices, i.e. the fewest whole thick slabs that span a multiple of it. (1, 1) for a
    predictor that is not fully convolutional: its output depends on the window anyway (per-window statistics,
    attention), and keeping the phase would cost it the depth cross-fade that hides that."""
    if not getattr(predict_fn, "fully_convolutional", False):
        return 1, 1
    depth_multiple = int(getattr(predict_fn, "depth_multiple", 1))
    return depth_multiple // math.gcd(depth_multiple, factor), int(getattr(predict_fn, "tile_multiple", 1))


def resolve_window(predict_fn: PredictFn, shape: tuple[int, ...], *, depth_thick: int, patch_size: int,
                   batch_size: int, depth_context: int = 0, depth_overlap: int = 0, window_depth: int = 0,
                   tile_size: int = 0) -> tuple[int, int, int]:
    """(window depth in thick slices, tile edge in pixels, windows per batch) for `predict_fn` on a (D, H, W) thick
    volume. 0 = choose: a predictor whose `fully_convolutional` attribute is true (no statistic spans voxels, so a
    window's interior does not depend on the window) gets whole slices up to AUTO_TILE_MAX pixels and the fewest
    windows of at most AUTO_WINDOW_DEPTH_MAX slices, made equal (a short series is one window: nothing is computed
    twice); any other keeps its training window (GroupNorm statistics of a larger window would differ from those
    it was trained with). A window larger than the training one gets a proportionally smaller batch, down to one
    window: the demo's model on a 32 x 512 x 512 window peaks near 6 GB of CPU memory; set window_depth / tile_size
    for a smaller budget."""
    fully_convolutional = bool(getattr(predict_fn, "fully_convolutional", False))
    multiple = int(getattr(predict_fn, "tile_multiple", 1))
    depth, height, width = shape[-3:]
    if window_depth < 0 or tile_size < 0:
        raise ValueError(f"window_depth and tile_size must be >= 0 (0 = automatic), got {window_depth}, {tile_size}")
    if tile_size and tile_size % multiple:
        raise ValueError(f"tile_size {tile_size} must be a multiple of {multiple} (the model's in-plane strides)")
    if not window_depth:
        window_depth = depth_thick
        if fully_convolutional:
            span = depth + 2 * depth_context  # thick slices the windows cover, context included
            shared = 2 * depth_context + depth_overlap  # slices neighbouring windows both compute
            count = 1 if span <= AUTO_WINDOW_DEPTH_MAX else 1 + math.ceil(
                (span - AUTO_WINDOW_DEPTH_MAX) / max(1, AUTO_WINDOW_DEPTH_MAX - shared))
            window_depth = max(depth_thick, min(AUTO_WINDOW_DEPTH_MAX,
                                                math.ceil((span + (count - 1) * shared) / count) + (count > 1)))
    if not tile_size:
        tile_size = patch_size
        if fully_convolutional:
            extent = min(max(height, width), AUTO_TILE_MAX)
            tile_size = max(patch_size, _round_up(extent, multiple))
    enlargement = (window_depth * tile_size**2) / float(depth_thick * patch_size**2)
    if enlargement > 1:
        batch_size = max(1, int(batch_size / enlargement))
    return window_depth, tile_size, batch_size


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _depth_span(start: int, plan: WindowPlan, keep_lo: int, keep_hi: int) -> tuple[int, int, int, int]:
    """Output thin rows [lo, hi) written by the window starting at padded thick slice `start`, and the window's
    rows [src_lo, src_lo + hi - lo) (relative to its kept part) that land there."""
    thin_depth = plan.depth * plan.factor
    first = (start - plan.pad_depth_start) * plan.factor + keep_lo  # output thin index of the first kept row
    lo, hi = max(first, 0), min(first + keep_hi - keep_lo, thin_depth)
    return lo, hi, lo - first, keep_lo + lo - first


def _accumulate(out, window, origin, plan, keep_lo, keep_hi, depth_weights, tile_weights) -> None:
    d0, y0, x0 = origin
    lo, hi, src_lo, row_lo = _depth_span(d0, plan, keep_lo, keep_hi)
    if hi <= lo:
        return
    # In-plane: crop the air padding.
    oy0, ox0 = y0 - plan.pad_y, x0 - plan.pad_x
    ys, xs = max(oy0, 0), max(ox0, 0)
    ye, xe = min(oy0 + plan.patch_size, plan.height), min(ox0 + plan.patch_size, plan.width)
    if ye <= ys or xe <= xs:
        return
    rows = window[row_lo : row_lo + hi - lo, ys - oy0 : ye - oy0, xs - ox0 : xe - ox0]
    weights = depth_weights[src_lo : src_lo + hi - lo, None, None] * tile_weights[None, ys - oy0 : ye - oy0,
                                                                                  xs - ox0 : xe - ox0]
    out[lo:hi, ys:ye, xs:xe] += rows * weights


def fit_depth_windows(depth_thick: int, depth_context: int, depth_overlap: int, period: int = 1
                      ) -> tuple[int, int, int]:
    """(context, overlap, period) that fit windows of `depth_thick`: overlap, then context, shrink until a window
    advances by at least `period` slices (the model's depth stride period; 1 for tiny models on 2-slice windows);
    a window shorter than the period drops it to 1. Warns when it changes a setting."""
    context, overlap = depth_context, depth_overlap
    if depth_thick < period:
        logger.warning("windows of %d thick slices are shorter than the model's depth stride period %d: windows "
                       "start out of phase (set infer.window_depth >= %d)", depth_thick, period, period)
        period = 1
    while depth_thick - 2 * context - overlap < period and overlap > 0:
        overlap -= 1
    while depth_thick - 2 * context - overlap < period and context > 0:
        context -= 1
    if (context, overlap) != (depth_context, depth_overlap):
        logger.warning(
            "windows of %d thick slices advancing by multiples of %d cannot hold depth_context=%d and "
            "depth_overlap=%d; using %d and %d", depth_thick, period, depth_context, depth_overlap, context, overlap,
        )
    return context, overlap, period


def interpolate_at_spacing(thick_hu: np.ndarray, predict_fn: PredictFn, *, pixel_spacing_mm: tuple[float, float],
                           model_pixel_spacing_mm: float | None, factor: int, **kwargs) -> np.ndarray:
    """`interpolate_volume` at the in-plane pixel spacing the model runs at (`ctld.data.domain.model_pixel_spacing_mm`:
    the spacing it was trained resampled to, or the nearest trained one for a series outside the trained range).

    The input is resampled to it and the model's correction of cubic interpolation, not its whole output, is
    resampled back and added to cubic interpolation on the input's own pixels: a round trip through coarser pixels
    would blur away the series' in-plane detail, which only the correction loses. Without a model spacing (or when
    the input already has it) it is `interpolate_volume` itself.
    """
    from ctld.baselines import interpolate_z
    from ctld.data.geometry import resample_inplane, resize_inplane

    if not model_pixel_spacing_mm or np.allclose(pixel_spacing_mm, model_pixel_spacing_mm, rtol=0.01):
        return interpolate_volume(thick_hu, predict_fn, factor=factor, **kwargs)
    resampled, _ = resample_inplane(np.asarray(thick_hu), (1.0, *pixel_spacing_mm), model_pixel_spacing_mm)
    logger.info("in-plane %s mm pixels resampled to the model's %.3g mm (%s -> %s), its correction back after the "
                "model", [round(v, 3) for v in pixel_spacing_mm], model_pixel_spacing_mm, tuple(thick_hu.shape[1:]),
                tuple(resampled.shape[1:]))
    # The inner run keeps beyond-window voxels too (its linear interpolation, about cubic there): the correction is
    # then ~0 in padding outside the field of view instead of model-minus-padding, which the resize would smear
    # across the field-of-view edge.
    correction = interpolate_volume(resampled, predict_fn, factor=factor, **kwargs)
    correction -= interpolate_z(resampled, factor, "cubic")
    thin = interpolate_z(np.asarray(thick_hu), factor, "cubic")
    thin += resize_inplane(correction, tuple(thick_hu.shape[1:]))
    if kwargs.get("hu_range") is not None and kwargs.get("keep_beyond", True):
        keep_beyond_window(thin, np.asarray(thick_hu), factor, kwargs["hu_range"])  # exact on the series' own grid
    return thin
