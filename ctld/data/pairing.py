"""Thick/thin pairing: which thick series partners which thin one, and the shard sample built from a pair.

A real pair is a thin and a thick series of one patient, study and frame of reference whose grids align
(`ctld.data.geometry.align`: same orientation and in-plane grid, spacing ratio = factor, thick slab centres on
thin slices). Thick slices whose slab is not fully inside the thin series are cropped, so `offset >= 0` in every
sample. A thin series without a partner gets a simulated thick input (`simulate_thick`, offset 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctld.data import geometry
from ctld.data.shards import encode_sample
from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume


@dataclass(frozen=True)
class Geometry:
    """What pairing needs to know about a series, available from headers before any pixel is decoded."""

    series_id: str
    case_id: str
    study_id: str
    frame_of_reference_id: str
    shape: tuple[int, int, int]  # (D, H, W)
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major

    @classmethod
    def of(cls, item) -> Geometry:
        """From a Volume or a `ctld.data.dicom.SeriesPlan`."""
        return cls(
            series_id=item.series_id,
            case_id=item.case_id,
            study_id=item.study_id,
            frame_of_reference_id=item.frame_of_reference_id,
            shape=tuple(int(v) for v in item.shape),
            spacing_mm=tuple(float(v) for v in item.spacing_mm),
            origin_mm=tuple(float(v) for v in item.origin_mm),
            direction=tuple(float(v) for v in np.asarray(item.direction).ravel()),
        )

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction).reshape(3, 3)


@dataclass(frozen=True)
class Alignment:
    """How a thick partner lines up with a thin series: keep thick slices [thick_start, thick_stop)."""

    thick_series_id: str
    offset: int  # thin index of the first thin slice under kept thick slice 0
    thick_start: int
    thick_stop: int


def spacing_class(spacing_z_mm: float, thin_max_spacing_mm: float, thick_min_spacing_mm: float) -> str:
    if spacing_z_mm <= thin_max_spacing_mm:
        return "thin"
    if spacing_z_mm >= thick_min_spacing_mm:
        return "thick"
    return "intermediate"


def align(thin: Geometry, thick: Geometry, factor: int) -> Alignment | None:
    """The alignment of `thick` to `thin`, or None when they are not a real pair with this factor: another
    patient, study or frame of reference, or grids that `ctld.data.geometry.align` refuses."""
    if thin.case_id != thick.case_id or thin.study_id != thick.study_id:
        return None
    if thin.frame_of_reference_id != thick.frame_of_reference_id:
        return None
    try:
        offset = geometry.align(thin, thick, factor)
    except geometry.AlignmentError:
        return None
    start, stop = geometry.covered_slabs(thick.shape[0], thin.shape[0], factor=factor, offset=offset)
    if stop - start < 1:
        return None
    return Alignment(thick.series_id, offset + start * factor, start, stop)


def find_partners(geometries: list[Geometry], factor: int, thin_max_mm: float, thick_min_mm: float):
    """Thin series -> best thick Alignment (or None); plus the series that become no sample and why.

    Returns:
        (partners {thin series_id: Alignment | None}, unused [(series_id, reason)])
    """
    thins = [g for g in geometries if spacing_class(g.spacing_mm[0], thin_max_mm, thick_min_mm) == "thin"]
    thicks = [g for g in geometries if spacing_class(g.spacing_mm[0], thin_max_mm, thick_min_mm) == "thick"]
    partners: dict[str, Alignment | None] = {}
    used = set()
    for thin in sorted(thins, key=lambda g: g.series_id):
        candidates = [a for a in (align(thin, thick, factor) for thick in thicks) if a is not None]
        best = max(candidates, key=lambda a: (a.thick_stop - a.thick_start, a.thick_series_id), default=None)
        partners[thin.series_id] = best
        if best is not None:
            used.add(best.thick_series_id)
    unused = [(g.series_id, "unpaired_thick") for g in thicks if g.series_id not in used]
    unused += [
        (g.series_id, "intermediate_spacing")
        for g in geometries
        if spacing_class(g.spacing_mm[0], thin_max_mm, thick_min_mm) == "intermediate"
    ]
    return partners, sorted(unused)


def sample_key(volume: Volume) -> str:
    return f"{volume.case_id}_{volume.series_id}"


def make_sample(
    thin: Volume,
    thick: Volume | None,
    alignment: Alignment | None,
    *,
    factor: int,
    split: str,
    inplane_spacing_mm: float = 0.0,
    thick_profile: str = "box",
) -> dict:
    """The shard sample (docs/DESIGN.md, Shard sample) of a thin volume and its real or simulated thick partner.

    Returns the encoded sample (`ctld.data.shards.encode_sample`)."""
    if thin.hu.shape[0] < factor:
        raise ValueError(f"thin series {thin.series_id} has {thin.hu.shape[0]} slices, fewer than factor={factor}")
    direction = np.asarray(thin.direction)
    if thick is not None and alignment is not None:
        if thick.hu.shape[1:] != thin.hu.shape[1:]:
            raise ValueError(f"thick series {thick.series_id} in-plane shape differs from thin {thin.series_id}")
        thick_hu = thick.hu[alignment.thick_start : alignment.thick_stop]
        thick_origin = np.asarray(thick.origin_mm) + alignment.thick_start * thick.spacing_mm[0] * direction[:, 2]
        thick_spacing = thick.spacing_mm
        offset, source = alignment.offset, "real"
        thick_meta = {k: v for k, v in thick.meta.items() if k in ("slice_thickness_mm", "kernel", "repairs")}
    else:
        thick_hu = simulate_thick(thin.hu, factor, thick_profile)
        dz = thin.spacing_mm[0]
        thick_origin = geometry.thick_origin_mm(thin.origin_mm, dz, direction, factor)
        thick_spacing = (dz * factor, thin.spacing_mm[1], thin.spacing_mm[2])
        offset, source, thick_meta = 0, "simulated", {"profile": thick_profile}
    thin_hu, thin_spacing = thin.hu, thin.spacing_mm
    if inplane_spacing_mm > 0:  # same resampling on both, so thick and thin stay on one in-plane grid
        thin_hu, thin_spacing = geometry.resample_inplane(thin_hu, thin_spacing, inplane_spacing_mm)
        thick_hu, resampled = geometry.resample_inplane(thick_hu, thick_spacing, inplane_spacing_mm)
        thick_spacing = (thick_spacing[0], resampled[1], resampled[2])
    thin_meta = {
        k: v
        for k, v in thin.meta.items()
        if k in ("source", "manufacturer", "model", "kernel", "slice_thickness_mm", "repairs")
    }
    info = {
        "case_id": thin.case_id,
        "series_id": thin.series_id,
        "study_id": thin.study_id,
        "split": split,
        "factor": int(factor),
        "offset": int(offset),
        "thick_source": source,
        "thin_spacing_mm": [float(v) for v in thin_spacing],
        "thick_spacing_mm": [float(v) for v in thick_spacing],
        "thin_origin_mm": [float(v) for v in thin.origin_mm],
        "thick_origin_mm": [float(v) for v in thick_origin],
        "direction": direction.tolist(),
        "shape_thin": list(thin_hu.shape),
        "shape_thick": list(thick_hu.shape),
        "meta": {**thin_meta, **({"thick": thick_meta} if thick_meta else {})},
    }
    if source == "real":
        info["thick_series_id"] = thick.series_id
    return encode_sample(sample_key(thin), thin_hu, thick_hu, info)


def make_inplane_sample(thick: Volume, axis: str, *, factor: int, split: str, thick_profile: str = "box",
                        inplane_spacing_mm: float = 0.0) -> dict:
    """The shard sample of one in-plane pair of a thick-only series (`ctld.data.inplane`): the in-plane `axis`
    resampled to dz / factor plays the slice axis; recorded as `thick_source: "inplane"` with `inplane_axis`."""
    from ctld.data.inplane import inplane_pair

    hu, spacing = thick.hu, thick.spacing_mm
    if inplane_spacing_mm > 0:  # the pixel grid the through-plane samples (and inference) use
        hu, spacing = geometry.resample_inplane(hu, spacing, inplane_spacing_mm)
    pair = inplane_pair(hu, spacing, axis=axis, factor=factor, profile=thick_profile)
    direction = np.asarray(thick.direction)
    # The pair's grid (columns W, H, D as in Volume.direction): depth = the chosen in-plane axis, rows = the
    # original slice axis, columns = the other in-plane axis.
    x, y, z = direction[:, 0], direction[:, 1], direction[:, 2]
    permuted = np.stack([x, z, y] if axis == "y" else [y, z, x], axis=1)
    info = {
        "case_id": thick.case_id,
        "series_id": thick.series_id,
        "study_id": thick.study_id,
        "split": split,
        "factor": int(factor),
        "offset": 0,
        "thick_source": "inplane",
        "inplane_axis": axis,
        "thin_spacing_mm": [float(v) for v in pair.thin_spacing_mm],
        "thick_spacing_mm": [float(v) for v in pair.thick_spacing_mm],
        "thin_origin_mm": [float(v) for v in thick.origin_mm],
        "thick_origin_mm": [float(v) for v in geometry.thick_origin_mm(thick.origin_mm, pair.thin_spacing_mm[0],
                                                                        permuted, factor)],
        "direction": permuted.tolist(),
        "shape_thin": list(pair.thin_hu.shape),
        "shape_thick": list(pair.thick_hu.shape),
        "meta": {k: v for k, v in thick.meta.items() if k in ("source", "manufacturer", "model", "kernel")}
        | {"thick": {"profile": thick_profile}},
    }
    return encode_sample(f"{thick.case_id}_{thick.series_id}-{axis}", pair.thin_hu, pair.thick_hu, info)
