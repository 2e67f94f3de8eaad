"""What a model saw in training, in aggregate, and how an input differs from it.

    domain = training_domain(read_manifest("shards"), hu_window=(-1024, 2048))   # ctld.json's `domain` block
    found = input_differences(thick.hu, thick.spacing_mm, meta, spacing_tolerance=0.25)
    check_input(found, name="thick_series/", allow=args.allow_out_of_distribution)   # refuse or warn

Everything here is counts, ranges and percentiles over the shard manifest; never a sample key or an id.

Warn or refuse (docs/usage.md): a refusal is a difference the model is not built for, where its output would be
wrong rather than worse: a slice spacing more than `spacing_tolerance` (default 50%) outside factor x the trained
thin spacings (the model would invent the wrong number of slices per slab), a pixel size more than 3x outside the
trained range (likely a wrong header or a scout, not a diagnostic series), or HU percentiles more than 300 HU
outside the trained range (not CT HU: an unapplied rescale, or another modality). Smaller differences are warnings
(a pixel size more than 10% outside is run resampled into the range: `model_pixel_spacing_mm`); `allow` turns
refusals into warnings too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

HU_PERCENTILES = (1.0, 99.0)  # robust ends of a series' HU: single hot or padding voxels do not move them
HU_SAMPLE_VOXELS = 2_000_000  # percentiles from a strided subsample: the same to ~1 HU, a fraction of the time
HU_WARN_HU = 50.0  # percentile outside the trained range by more: warning
HU_REFUSE_HU = 300.0  # by more: refusal
PIXEL_RESAMPLE_RATIO = 1.1  # pixel spacing outside the trained range by more: the model runs on it resampled
PIXEL_REFUSE_RATIO = 3.0  # by more than this factor: refusal
SPACING_WARN_RTOL = 0.05  # slice spacing outside factor x the trained thin-spacing range by more: warning
# Recorded in every export (ctld.json `slice_spacing_policy`, the model card): how a model trained on series of
# mixed thin spacings treats spacing. Thin series are never resampled along z (that would blur the targets); the
# model learns factor thin slices per thick slice at every trained spacing, and a thick input fits within
# infer.spacing_tolerance of factor x the trained thin spacings.
SLICE_SPACING_POLICY = "slices: trained across the thin spacings in domain.thin_spacing_mm, none resampled along z"
# In-plane, the model runs at a pixel size it was trained at (`model_pixel_spacing_mm`); only its correction of cubic
# interpolation is resampled back, so the series keeps its own in-plane detail (ctld.inferer.interpolate_at_spacing).
PIXEL_SPACING_POLICY = (f"pixels: a series more than {PIXEL_RESAMPLE_RATIO - 1:.0%} outside the trained pixel spacings "
                        "(domain.pixel_spacing_mm) is run resampled in-plane to the nearest trained spacing (to "
                        "inplane_spacing_mm for a model trained resampled); the model's correction of cubic "
                        "interpolation is resampled back onto the series' own pixels")


@dataclass(frozen=True)
class Difference:
    """One way an input lies outside the training domain; `refuse` when the model is not built for it."""

    what: str  # "slice_spacing" | "pixel_spacing" | "hu"
    text: str
    refuse: bool


class OutOfDistributionError(ValueError):
    """An input the model was not built for; the message names each difference and the flag to go on."""


def hu_percentiles(hu: np.ndarray) -> tuple[float, float]:
    """(1st, 99th) HU percentile of a volume, over a strided subsample of at most HU_SAMPLE_VOXELS voxels."""
    flat = np.asarray(hu).reshape(-1)
    stride = max(1, flat.size // HU_SAMPLE_VOXELS)
    sample = flat[::stride]
    if sample.size and sample.dtype.kind in "iu":
        return _sorted_percentiles(sample)
    low, high = np.percentile(sample, HU_PERCENTILES)
    return float(low), float(high)


def _sorted_percentiles(values: np.ndarray) -> tuple[float, float]:
    """np.percentile(values, HU_PERCENTILES) (method "linear") of an integer array, bit for bit, from one sort
    (numpy's own partition for four order statistics costs several times more, in the shard builder's inner loop)."""
    ordered = np.sort(values)
    count = values.size
    # numpy's _quantile: virtual index (n - 1) q, its floor and the next order statistic, then _lerp.
    virtual = (count - 1) * np.true_divide(np.asarray(HU_PERCENTILES), 100)
    previous = np.minimum(np.floor(virtual), count - 1).astype(np.intp)
    below, above = ordered[previous], ordered[np.minimum(previous + 1, count - 1)]
    gamma = virtual - previous
    difference = above - below
    result = np.add(below, difference * gamma)
    np.subtract(above, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return float(result[0]), float(result[1])


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def training_domain(manifest: dict[str, Any], *, hu_window: tuple[float, float]) -> dict[str, Any]:
    """ctld.json's `domain`: the ranges the training shards cover (from `ctld.data.shards.read_manifest`).

    Returns {"thin_spacing_mm": {min, median, max}, "pixel_spacing_mm": {min, median, max} (of the training split's
    grid, after any in-plane resampling; of every split for manifests before ctld recorded them per split),
    "hu_p1" / "hu_p99": {min, median, max} over the thick series (every split; shards built before ctld recorded
    them lack these), "hu_window": [lo, hi]}.
    """
    geometry = manifest.get("geometry", {})
    pixel = [geometry.get(f"pixel_spacing_{axis}_mm", {}) for axis in ("y", "x")]
    domain: dict[str, Any] = {"hu_window": [float(hu_window[0]), float(hu_window[1])]}
    if geometry.get("thin_spacing_z_mm"):
        domain["thin_spacing_mm"] = dict(geometry["thin_spacing_z_mm"])
    if all(pixel):
        domain["pixel_spacing_mm"] = {"min": min(p["min"] for p in pixel), "median": float(np.mean(
            [p["median"] for p in pixel])), "max": max(p["max"] for p in pixel)}
    # The training split's own ranges where the manifest records them (never a held-out patient's spacing).
    train = manifest.get("splits", {}).get("train", {})
    for key, name in (("thin_spacing_z_mm", "thin_spacing_mm"), ("pixel_spacing_mm", "pixel_spacing_mm")):
        if train.get(key):
            domain[name] = dict(train[key])
    for key in ("p1", "p99"):
        stats = manifest.get("hu", {}).get(key)
        if stats:
            domain[f"hu_{key}"] = dict(stats)
    return domain


def data_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model card's training data: counts per split and pair kind, geometry and HU ranges. Only aggregates
    are copied (never the manifest's shard, skipped or unused lists, which name series by hash)."""
    splits = {}
    for split, info in manifest.get("splits", {}).items():
        splits[split] = {"series": info.get("samples"), "patients": info.get("patients"),
                         "pairs": dict(info["thick_source"]) if "thick_source" in info else None}
    geometry = manifest.get("geometry", {})
    return {
        "shards_format_version": manifest.get("format_version"),
        "factor": manifest.get("factor"),
        "thick_profile": manifest.get("thick_profile"),
        "splits": splits,
        "pairs": dict(manifest.get("thick_source", {})),
        "series_skipped": len(manifest.get("skipped", [])),
        "skipped_reasons": dict(manifest.get("skipped_counts", {})),
        "thin_spacing_mm": geometry.get("thin_spacing_z_mm") or None,
        "pixel_spacing_y_mm": geometry.get("pixel_spacing_y_mm") or None,
        "pixel_spacing_x_mm": geometry.get("pixel_spacing_x_mm") or None,
        "inplane_resampled_to_mm": manifest.get("settings", {}).get("inplane_spacing_mm") or None,
        "thin_depth": geometry.get("thin_depth") or None,
        "image_size": {"height": geometry.get("height") or None, "width": geometry.get("width") or None},
        "hu_p1": manifest.get("hu", {}).get("p1"),
        "hu_p99": manifest.get("hu", {}).get("p99"),
    }


def _outside(value: float, low: float, high: float) -> float:
    """How far `value` lies outside [low, high] (0 inside)."""
    return max(low - value, value - high, 0.0)


def model_pixel_spacing_mm(meta: dict[str, Any], pixel_spacing_mm) -> float | None:
    """The square in-plane pixel spacing (mm) the export's model runs a series of `pixel_spacing_mm` (dy, dx) at, or
    None for the series' own pixels.

    A model trained on resampled shards (`inplane_spacing_mm`) runs at that spacing. Otherwise a series more than
    PIXEL_RESAMPLE_RATIO outside the trained range `domain.pixel_spacing_mm` runs at the nearest end of it, where
    its anatomy has the size in pixels the model learnt (measured in docs/quality.md).
    """
    dy, dx = (float(v) for v in pixel_spacing_mm)
    trained = meta.get("inplane_spacing_mm")
    if trained:
        return None if np.allclose((dy, dx), float(trained), rtol=0.01) else float(trained)
    seen = meta.get("domain", {}).get("pixel_spacing_mm")
    if not seen:
        return None
    low, high = float(seen["min"]), float(seen["max"])
    if all(low / PIXEL_RESAMPLE_RATIO <= value <= high * PIXEL_RESAMPLE_RATIO for value in (dy, dx)):
        return None
    return float(np.clip(np.sqrt(dy * dx), low, high))


def input_differences(hu: np.ndarray, spacing_mm, meta: dict[str, Any], *,
                      spacing_tolerance: float) -> list[Difference]:
    """How a thick input (HU (D, H, W), spacing (dz, dy, dx) mm) differs from what the export's model saw.

    Args:
        meta: the export's ctld.json (factor, thin_spacing_mm, inplane_spacing_mm, domain, hu_min, hu_max).
        spacing_tolerance: relative slice-spacing difference from factor x thin_spacing_mm that is refused
            (< 0: never refused, only warned).
    """
    found: list[Difference] = []
    factor = int(meta["factor"])
    domain = meta.get("domain", {})
    dz, dy, dx = (float(v) for v in spacing_mm)
    if "thin_spacing_mm" in meta:
        # Mixed thin spacings (docs/DESIGN.md, "Slice spacing policy"): the model works in slices, factor thin slices
        # per thick slice, whatever their spacing in mm; a thick input fits when its spacing lies within factor x the
        # thin spacings it was trained on (the median alone for exports without a recorded range).
        thin_mm = float(meta["thin_spacing_mm"])
        seen = domain.get("thin_spacing_mm") or {"min": thin_mm, "max": thin_mm}
        low, high = factor * float(seen["min"]), factor * float(seen["max"])
        ratio = max(low / dz, dz / high)  # 1 inside the trained range
        trained = f"{low:.3g}-{high:.3g} mm" if high > low else f"{low:.3g} mm"
        if spacing_tolerance >= 0 and ratio > 1.0 + spacing_tolerance:
            found.append(Difference("slice_spacing", (
                f"slice spacing {dz:.3f} mm does not fit this model: it was trained on thick slices of {trained} "
                f"(factor {factor} x thin {seen['min']:.3g}-{seen['max']:.3g} mm), and {dz:.3f} mm is "
                f"{dz / thin_mm:.2f} thin slices of {thin_mm:.3g} mm ({ratio:.2f}x outside; tolerance "
                f"{spacing_tolerance:.0%}; --spacing_tolerance=-1 never refuses)"), True))
        elif ratio > 1.0 + SPACING_WARN_RTOL:
            found.append(Difference("slice_spacing", (
                f"slice spacing {dz:.3f} mm is outside the trained {trained} (factor {factor} x thin "
                f"{seen['min']:.3g}-{seen['max']:.3g} mm; {ratio:.2f}x)"), False))
    pixel = domain.get("pixel_spacing_mm")
    if pixel and not meta.get("inplane_spacing_mm"):  # resampled models see their own pixel size whatever comes in
        run_at = model_pixel_spacing_mm(meta, (dy, dx))
        for axis, value in (("row", dy), ("column", dx)):
            ratio = max(pixel["min"] / value, value / pixel["max"])
            if ratio > PIXEL_RESAMPLE_RATIO:
                found.append(Difference("pixel_spacing", (
                    f"{axis} pixel spacing {value:.3f} mm is outside the trained {pixel['min']:.3g}-"
                    f"{pixel['max']:.3g} mm ({ratio:.2f}x; the model runs it resampled to {run_at:.3g} mm pixels; "
                    f"refused beyond {PIXEL_REFUSE_RATIO:g}x)"), ratio > PIXEL_REFUSE_RATIO))
    low_hu, high_hu = float(meta["hu_min"]), float(meta["hu_max"])
    if domain.get("hu_p1") and domain.get("hu_p99"):
        # Compared inside the model's window, where percentiles commute with the clipping the model applies:
        # padding below hu_min or metal above hu_max is not a difference the model sees.
        p1, p99 = (float(np.clip(v, low_hu, high_hu)) for v in hu_percentiles(hu))
        for name, value, seen in (("1st", p1, domain["hu_p1"]), ("99th", p99, domain["hu_p99"])):
            lo, hi = (float(np.clip(seen[k], low_hu, high_hu)) for k in ("min", "max"))
            off = _outside(value, lo, hi)
            if off > HU_WARN_HU:
                refuse = off > HU_REFUSE_HU
                found.append(Difference("hu", (
                    f"{name} HU percentile {value:.0f} is {off:.0f} HU outside the training series' {lo:.0f} to "
                    f"{hi:.0f} HU" + (" (not CT HU? a rescale not applied, or another modality)" if refuse else
                                      f" (refused beyond {HU_REFUSE_HU:.0f} HU)")), refuse))
    return found


def check_input(found: list[Difference], *, name: str, allow: bool) -> None:
    """Refuse (OutOfDistributionError, one line) when a difference is a refusal and `allow` is False; otherwise
    log each difference as a warning."""
    refused = [d for d in found if d.refuse]
    if refused and not allow:
        raise OutOfDistributionError(
            f"{name}: outside what the model was trained on: {'; '.join(d.text for d in refused)}. Pass "
            "--allow_out_of_distribution to run anyway"
        )
    for difference in found:
        overridden = " (a refusal, overridden by --allow_out_of_distribution)" if difference.refuse else ""
        logger.warning("%s: %s%s", name, difference.text, overridden)
