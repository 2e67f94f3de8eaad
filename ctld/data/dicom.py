"""Read DICOM CT series into `Volume`s: discover, scan headers, group, validate, sort, decode to HU.

    volumes = read_dicom_series("/data/study_0001", salt="my-secret")         # folders and ZIPs, recursively
    pairs = read_dicom_series(paths, salt="s", with_reference=True)           # [(Volume, pydicom.Dataset)]

The shard builder uses the steps one by one, so it can scan headers in parallel and plan thick/thin pairs
before decoding any pixels:

    scan_file(path, rel_path) -> list[SliceHeader]     one per frame (enhanced multi-frame CT)  (dicom_scan)
    group_series(headers)     -> {series_key: [SliceHeader]}
    plan_series(slices, salt, policy) -> SeriesPlan    sorted, validated (or SeriesSkipped with a reason)
    load_series(plan)         -> Volume                decode + HU                               (dicom_pixels)

This module groups, validates and plans; `scan_file`, `load_series` and `SeriesSkipped` are importable from here
too. Facts about real CT files it relies on (tests/test_dicom.py checks each on public files): slices are
ordered by ImagePositionPatient projected on the normal of ImageOrientationPatient, never by InstanceNumber; the
slice spacing comes from those positions, never from SliceThickness or SpacingBetweenSlices (with gantry tilt the
tag holds the table increment).

Identifiers (patient id, UIDs) live only in memory in `SliceHeader` and are turned into salted hashes
(`anon_id`) in `SeriesPlan` before anything leaves these modules in a `Volume`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pydicom

from ctld.data.dicom_pixels import load_series
from ctld.data.dicom_scan import SeriesSkipped, SliceHeader, scan_file

logger = logging.getLogger(__name__)

# Validation reasons, with the config key that sets the policy for the repairable ones.
REASON_POLICY = {
    "duplicate_positions": "on_duplicate_positions",
    "missing_slices": "on_missing_slices",
    "nonuniform_spacing": "on_nonuniform_spacing",
    "gantry_tilt": "on_gantry_tilt",
}


@dataclass(frozen=True)
class Policy:
    """What to do per validation reason ("skip" or "repair"); mirrors the `shards` config section."""

    min_slices: int = 8
    on_duplicate_positions: str = "repair"
    on_missing_slices: str = "skip"
    on_nonuniform_spacing: str = "skip"
    on_gantry_tilt: str = "skip"

    @classmethod
    def from_config(cls, shards_cfg) -> Policy:
        return cls(**{name: getattr(shards_cfg, name) for name in cls.__dataclass_fields__})


def anon_id(value: str, salt: str, kind: str, length: int = 16) -> str:
    """Salted HMAC-SHA256 of an identifier, hex; `kind` keeps e.g. a patient and a series with equal ids apart."""
    digest = hmac.new(salt.encode(), f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:length]


def group_series(headers: list[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Series key -> its slices, in a deterministic order (sorted by key, then file and frame)."""
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_key].append(header)
    return {
        key: sorted(groups[key], key=lambda h: (h.path, -1 if h.frame is None else h.frame)) for key in sorted(groups)
    }


@dataclass
class SeriesPlan:
    """A validated series: slices in increasing position along the normal, with the geometry they imply."""

    slices: list[SliceHeader]  # sorted, one per position (duplicates kept in `duplicates`)
    duplicates: list[list[SliceHeader]]  # per kept slice: other slices at the same position (repair checks pixels)
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: np.ndarray
    case_id: str
    series_id: str
    study_id: str
    frame_of_reference_id: str
    tilt_shift_mm: np.ndarray | None = None  # (D, 2) in-plane shift per slice that undoes a gantry tilt
    repairs: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slices), self.slices[0].rows, self.slices[0].columns)


def series_ids(slices: list[SliceHeader], salt: str) -> tuple[str, str, str, str]:
    """(case_id, series_id, study_id, frame_of_reference_id) salted hashes of a series."""
    first = slices[0]
    return (
        anon_id(first.patient_key, salt, "patient"),
        anon_id(first.series_key, salt, "series"),
        anon_id(first.study_key, salt, "study"),
        anon_id(first.frame_of_reference, salt, "frame_of_reference") if first.frame_of_reference else "",
    )


def _longest_uniform_run(steps: np.ndarray, spacing: float, tolerance: float) -> tuple[int, int]:
    """[start, stop) slice indices of the longest run whose every step is within tolerance of `spacing`."""
    best = (0, 1)
    start = 0
    for i, step in enumerate(steps):
        if abs(step - spacing) > tolerance:
            start = i + 1
        if i + 2 - start > best[1] - best[0]:
            best = (start, i + 2)
    return best


def _grid_key(header: SliceHeader) -> tuple:
    return (
        tuple(round(v, 3) for v in header.orientation),
        header.rows,
        header.columns,
        tuple(round(v, 4) for v in header.pixel_spacing),
    )


def plan_series(slices: list[SliceHeader], salt: str, policy: Policy = Policy()) -> SeriesPlan:
    """Validate and sort one series from its headers alone. Raises SeriesSkipped with a named reason."""
    first = slices[0]
    case_id, series_id, study_id, frame_of_reference_id = series_ids(slices, salt)
    if first.modality != "CT":
        raise SeriesSkipped("non_ct_modality", f"Modality is {first.modality or 'empty'}, expected CT")
    missing = [h.rel_path for h in slices if h.position is None or h.orientation is None or h.pixel_spacing is None]
    if missing:
        raise SeriesSkipped(
            "missing_geometry",
            f"{len(missing)} slice(s) lack a usable ImagePositionPatient/Orientation/PixelSpacing (absent, not "
            "finite, or a spacing <= 0)",
        )
    # A localizer or a reformat filed under the same series: keep the clear majority of one grid, if any.
    repairs = []
    grids = Counter(_grid_key(h) for h in slices)
    if len(grids) > 1:
        grid, count = grids.most_common(1)[0]
        orientation_differs = len({key[0] for key in grids}) > 1
        reason = "mixed_orientations" if orientation_differs else "mixed_image_size"
        if count * 2 <= len(slices):
            what = "ImageOrientationPatient" if orientation_differs else "Rows/Columns/PixelSpacing"
            counts = sorted(grids.values(), reverse=True)
            raise SeriesSkipped(reason, f"slices differ in {what}; no grid holds a majority (slices per grid {counts})")
        repairs.append(f"dropped {len(slices) - count} slice(s) on another grid ({reason}, e.g. a localizer)")
        slices = [h for h in slices if _grid_key(h) == grid]
        first = slices[0]
    row_cosine = np.array(first.orientation[:3])
    column_cosine = np.array(first.orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2 or abs(row_cosine @ column_cosine) > 1e-2:
        raise SeriesSkipped("invalid_orientation", f"ImageOrientationPatient {first.orientation} is not orthonormal")
    normal /= np.linalg.norm(normal)

    positions = np.array([h.position for h in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]

    # Duplicate positions: keep the first, remember the others so load_series can check they are identical.
    kept, duplicates = [0], [[]]
    for i in range(1, len(slices)):
        if np.linalg.norm(positions[i] - positions[kept[-1]]) < 1e-3:
            duplicates[-1].append(slices[i])
        else:
            kept.append(i)
            duplicates.append([])
    if len(kept) < len(slices):
        count = len(slices) - len(kept)
        if policy.on_duplicate_positions != "repair":
            raise SeriesSkipped("duplicate_positions", f"{count} slice(s) share a position with another slice")
        repairs.append(f"dropped {count} slice(s) at duplicate positions")
    if len(kept) == 1 and len(slices) > 1:
        raise SeriesSkipped("duplicate_positions", f"all {len(slices)} slices share one position: not a volume")
    slices = [slices[i] for i in kept]
    positions, along = positions[kept], along[kept]
    if len(slices) < 2:
        raise SeriesSkipped("too_few_slices", f"1 slice, need {policy.min_slices}")

    steps = np.diff(along)
    spacing = float(np.median(steps))
    tolerance = max(0.02 * spacing, 0.01)
    irregular = np.abs(steps - spacing) > tolerance
    if irregular.any():
        ratio = steps[irregular] / spacing
        is_gap = np.all(np.abs(ratio - np.rint(ratio)) * spacing <= tolerance) and np.all(np.rint(ratio) >= 2)
        reason = "missing_slices" if is_gap else "nonuniform_spacing"
        detail = f"steps along the normal range {steps.min():.3f}..{steps.max():.3f} mm around {spacing:.3f} mm" + (
            f" ({int(np.sum(np.rint(ratio) - 1))} slice(s) missing)" if is_gap else ""
        )
        if getattr(policy, REASON_POLICY[reason]) != "repair":
            raise SeriesSkipped(reason, detail)
        start, stop = _longest_uniform_run(steps, spacing, tolerance)
        if stop - start < policy.min_slices:
            raise SeriesSkipped(reason, f"{detail}; longest regular run has {stop - start} slices")
        repairs.append(f"kept the longest regular run, slices {start}..{stop - 1} of {len(slices)} ({reason})")
        slices, duplicates = slices[start:stop], duplicates[start:stop]
        positions, along = positions[start:stop], along[start:stop]
        spacing = float(np.mean(np.diff(along)))
    else:
        spacing = float((along[-1] - along[0]) / (len(along) - 1))
    if len(slices) < policy.min_slices:
        raise SeriesSkipped("too_few_slices", f"{len(slices)} distinct slice position(s), need {policy.min_slices}")

    # Gantry tilt: consecutive positions step along a vector that is not the slice normal, so the volume is
    # sheared (the SpacingBetweenSlices tag then holds the table increment, not the normal spacing).
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)  # (D, 3)
    shift_mm = np.stack([in_plane @ row_cosine, in_plane @ column_cosine], axis=1)  # (D, 2) along x, y
    dy, dx = first.pixel_spacing
    tilt_shift = None
    if np.abs(shift_mm).max(initial=0.0) > 0.1 * min(dx, dy):
        step = positions[-1] - positions[0]
        angle = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0, 1))))
        detail = f"slices step {angle:.1f} deg off the slice normal (true normal spacing {spacing:.3f} mm)"
        if policy.on_gantry_tilt != "repair":
            raise SeriesSkipped("gantry_tilt", detail)
        repairs.append(f"resampled in-plane to undo the shear of {detail}")
        tilt_shift = shift_mm

    direction = np.stack([row_cosine, column_cosine, normal], axis=1)
    thicknesses = [h.slice_thickness for h in slices if h.slice_thickness]
    meta = {
        **{k: v for k, v in first.meta.items() if v},
        "source": "dicom",
        "slice_thickness_mm": float(np.median(thicknesses)) if thicknesses else spacing,
    }
    if repairs:
        meta["repairs"] = repairs
    return SeriesPlan(
        slices=slices,
        duplicates=duplicates,
        spacing_mm=(spacing, float(dy), float(dx)),
        origin_mm=tuple(float(v) for v in positions[0]),
        direction=direction,
        case_id=case_id,
        series_id=series_id,
        study_id=study_id,
        frame_of_reference_id=frame_of_reference_id,
        tilt_shift_mm=tilt_shift,
        repairs=repairs,
        meta=meta,
    )


def read_dicom_series(
    paths_or_dir,
    *,
    salt: str = "",
    policy: Policy = Policy(),
    strict: bool = False,
    with_reference: bool = False,
) -> list:
    """Every valid CT series under the given folders/files (ZIPs included) as Volumes, sorted by series_id.

    Args:
        paths_or_dir: a folder, a file, or a list of them; folders are searched recursively, ZIPs extracted to
            a temporary folder that is removed afterwards.
        salt: salt of the anonymous ids (`anon_id`).
        policy: per-reason validation policy (`Policy.from_config(cfg.shards)`).
        strict: raise ValueError on the first skipped series instead of logging and leaving it out.
        with_reference: return `(volume, dataset)` pairs, where `dataset` is the header of the series' first
            slice (for `write_dicom_series(..., reference=dataset)`); otherwise volumes only.
    """
    from ctld.data.archive import discover

    results = []
    with discover(paths_or_dir) as files:
        headers = []
        for path, rel_path in files:
            try:
                headers.extend(scan_file(path, rel_path))
            except SeriesSkipped as skipped:
                if skipped.reason != "not_dicom":
                    logger.warning("skipped file %s: %s", rel_path, skipped)
        for slices in group_series(headers).values():
            try:
                plan = plan_series(slices, salt, policy)
                volume = load_series(plan)
            except SeriesSkipped as skipped:
                series_id = anon_id(slices[0].series_key, salt, "series")
                message = f"series {series_id} (first file {slices[0].rel_path}) skipped: {skipped}"
                if strict:
                    raise ValueError(message) from skipped
                logger.warning(message)
                continue
            if with_reference:
                results.append((volume, pydicom.dcmread(plan.slices[0].path, stop_before_pixels=True)))
            else:
                results.append(volume)
    return sorted(results, key=lambda r: (r[0] if with_reference else r).series_id)


read_series = read_dicom_series
