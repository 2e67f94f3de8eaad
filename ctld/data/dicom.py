"""Read DICOM CT series into `Volume`s: discover, scan headers, group, validate, sort, decode to HU.

    volumes = read_dicom_series("/data/study_0001", salt="my-secret")         # folders and ZIPs, recursively
    pairs = read_dicom_series(paths, salt="s", with_reference=True)           # [(Volume, pydicom.Dataset)]

The shard builder uses the steps one by one, so it can scan headers in parallel and plan thick/thin pairs
before decoding any pixels:

    scan_file(path, rel_path) -> list[SliceHeader]     one per frame (enhanced multi-frame CT: one per frame)
    group_series(headers)     -> {series_key: [SliceHeader]}
    plan_series(slices, salt, policy) -> SeriesPlan    sorted, validated (or SeriesSkipped with a reason)
    load_series(plan)         -> Volume                decode + HU

Facts about real CT files this module relies on (tests/test_dicom.py checks each on public files): slices are
ordered by ImagePositionPatient projected on the normal of ImageOrientationPatient, never by InstanceNumber; the
slice spacing comes from those positions, never from SliceThickness or SpacingBetweenSlices (with gantry tilt the
tag holds the table increment); HU = stored * RescaleSlope + RescaleIntercept; SeriesInstanceUID may be empty, so
grouping falls back to a key of study, frame of reference, orientation, pixel spacing, size and series number.

Identifiers (patient id, UIDs) live only in memory in `SliceHeader` and are turned into salted hashes
(`anon_id`) before anything leaves this module in a `Volume`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000TransferSyntaxes

from ctld.data.volume import Volume

logger = logging.getLogger(__name__)

# Transfer syntaxes no installed pixel-data plugin decodes: retired JPEG spectral selection / progressive.
UNSUPPORTED_SYNTAXES = {
    "1.2.840.10008.1.2.4.53": "JPEG Spectral Selection, Non-Hierarchical (retired)",
    "1.2.840.10008.1.2.4.55": "JPEG Full Progression, Non-Hierarchical (retired)",
}
CT_STORAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}

# Validation reasons, with the config key that sets the policy for the repairable ones.
REASON_POLICY = {
    "duplicate_positions": "on_duplicate_positions",
    "missing_slices": "on_missing_slices",
    "nonuniform_spacing": "on_nonuniform_spacing",
    "gantry_tilt": "on_gantry_tilt",
}


class SeriesSkipped(Exception):
    """A file or series that cannot become a Volume; `reason` is a short stable name, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


@dataclass
class SliceHeader:
    """One image plane (a file, or one frame of an enhanced multi-frame file). Holds raw identifiers in memory
    only; never log or write its fields other than `rel_path`, `frame` and geometry."""

    path: str
    rel_path: str
    frame: int | None  # None: single-frame file; else frame index in an enhanced multi-frame file
    series_key: str
    patient_key: str
    study_key: str
    frame_of_reference: str
    modality: str
    sop_class: str
    transfer_syntax: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing dy, column spacing dx)
    slice_thickness: float | None
    slope: float
    intercept: float
    pixel_offset: int = -1  # >= 0: uncompressed 16-bit pixels start here (read without pydicom)
    pixel_dtype: str = "<i2"
    meta: dict = field(default_factory=dict)


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def _float_or(value, default: float | None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if np.isfinite(number) else default


def _rescale(value, default: float, keyword: str, rel_path: str) -> float:
    """RescaleSlope/Intercept: absent or empty = `default`; present but not a finite number (or a zero slope) =
    the HU cannot be known, so the file is skipped rather than read with a made-up scale."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else "" if value is None else str(value)
    if not text.strip(" \x00"):
        return default
    number = _float_or(value, None)
    if number is None or (keyword == "RescaleSlope" and number == 0):
        raise SeriesSkipped("bad_rescale", f"{rel_path}: {keyword} {text.strip()!r} is not a usable number")
    return number


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _first_item(ds: pydicom.Dataset, keyword: str) -> pydicom.Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional(frame_groups: pydicom.Dataset | None, shared: pydicom.Dataset | None, seq: str, keyword: str):
    """Value of `keyword` from the per-frame functional group `seq`, else the shared one (PS3.3 C.7.6.16)."""
    for groups in (frame_groups, shared):
        if groups is None:
            continue
        item = _first_item(groups, seq)
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def read_header(path: str | os.PathLike) -> tuple[pydicom.Dataset, int]:
    """Header of one DICOM file (pixels not read) and the file offset where reading stopped (the Pixel Data
    element, if any); raises SeriesSkipped("not_dicom") for anything else."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            return ds, fp.tell()
    except InvalidDicomError:
        pass
    except Exception as error:  # pydicom raises many types on damaged files
        raise SeriesSkipped("unreadable_header", f"{type(error).__name__}: {error}") from error
    # Files without the 128-byte preamble exist in the wild; accept them only if they look like images.
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            offset = fp.tell()
    except Exception as error:
        raise SeriesSkipped("not_dicom", f"not a DICOM file ({type(error).__name__})") from error
    if "Rows" not in ds or "SOPClassUID" not in ds:
        raise SeriesSkipped("not_dicom", "no DICOM preamble and no image attributes")
    return ds, offset


NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # syntax -> explicit VR


def _native_pixel_offset(path, ds, transfer_syntax: str, offset: int) -> int:
    """Byte offset of the pixel values when they can be read straight from the file (uncompressed little
    endian, one 16-bit frame, no unused high bits to sign-extend), else -1 (decode with pydicom)."""
    explicit = NATIVE_LITTLE_ENDIAN.get(transfer_syntax)
    if explicit is None or int(_float_or(ds.get("NumberOfFrames", 1), 1) or 1) != 1 or ds.get("BitsAllocated") != 16:
        return -1
    if int(ds.get("SamplesPerPixel", 1)) != 1 or (ds.get("PixelRepresentation") == 1 and ds.get("BitsStored") != 16):
        return -1
    with open(path, "rb") as fp:
        fp.seek(offset)
        element = fp.read(12)
    if len(element) < 12 or element[:4] != b"\xe0\x7f\x10\x00":
        return -1
    if explicit:
        if element[4:6] not in (b"OW", b"OB"):
            return -1
        length, start = int.from_bytes(element[8:12], "little"), offset + 12
    else:
        length, start = int.from_bytes(element[4:8], "little"), offset + 8
    return start if length == int(ds.get("Rows")) * int(ds.get("Columns")) * 2 else -1


_US_KEYWORDS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"}


class _RawHeader:
    """Read-only access to the few values `scan_file` needs, straight from pydicom's raw (unconverted) elements.
    Converting values through `Dataset.__getattr__` costs more than reading the header itself; this keeps the
    header scan close to a bare `dcmread`. Converted elements and big endian files go through pydicom."""

    def __init__(self, ds: pydicom.Dataset, little_endian: bool):
        self.ds = ds
        self.little_endian = little_endian

    def get(self, keyword: str, default=None):
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in self.ds:
            return default
        element = self.ds.get_item(tag)
        if element is None:
            return default
        if not isinstance(element, RawDataElement) or not self.little_endian or keyword.endswith("Sequence"):
            value = self.ds[tag].value
            return default if value is None else value
        value = element.value
        if value is None:
            return default
        if keyword in _US_KEYWORDS:
            return int.from_bytes(value[:2], "little") if len(value) >= 2 else default
        text = value.decode("latin-1").strip(" \x00")
        return text.split("\\") if "\\" in text else text

    def text(self, keyword: str) -> str:
        value = self.get(keyword, "")
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = "\\".join(str(v) for v in value)
        return str(value).strip()


def scan_file(path: str | os.PathLike, rel_path: str) -> list[SliceHeader]:
    """Image planes of one file. Raises SeriesSkipped for files that hold no usable CT image."""
    ds, stop_offset = read_header(path)
    transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    header = _RawHeader(ds, transfer_syntax != "1.2.840.10008.1.2.2")
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesSkipped("no_pixel_data", f"SOP class {header.text('SOPClassUID') or '?'} holds no image")
    if transfer_syntax in UNSUPPORTED_SYNTAXES:
        raise SeriesSkipped(
            "unsupported_transfer_syntax",
            f"no installed decoder for {transfer_syntax} ({UNSUPPORTED_SYNTAXES[transfer_syntax]}); convert the "
            "file first, e.g. `gdcmconv --raw` or `dcmdjpeg`",
        )
    modality = header.text("Modality").upper()
    series_uid = header.text("SeriesInstanceUID")
    study_uid = header.text("StudyInstanceUID")
    frame_of_reference = header.text("FrameOfReferenceUID")
    patient_key = header.text("PatientID") or "|".join(
        (header.text("PatientName"), header.text("PatientBirthDate"))
    ).strip("|")
    study_key = study_uid or "|".join((patient_key, header.text("StudyDate"), header.text("StudyTime")))
    patient_key = patient_key or f"study:{study_key}"
    meta = {
        "manufacturer": header.text("Manufacturer"),
        "model": header.text("ManufacturerModelName"),
        "kernel": header.text("ConvolutionKernel"),
        "transfer_syntax": transfer_syntax,
    }
    common = dict(
        path=str(path),
        rel_path=rel_path,
        patient_key=patient_key,
        study_key=study_key,
        frame_of_reference=frame_of_reference,
        modality=modality,
        sop_class=header.text("SOPClassUID"),
        transfer_syntax=transfer_syntax,
        rows=int(header.get("Rows")),
        columns=int(header.get("Columns")),
        pixel_offset=_native_pixel_offset(path, header, transfer_syntax, stop_offset),
        pixel_dtype="<i2" if header.get("PixelRepresentation") == 1 else "<u2",
    )

    number_of_frames = int(_float_or(header.get("NumberOfFrames", 1), 1) or 1)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    headers = []
    for frame in range(number_of_frames):
        if per_frame is not None or shared is not None:  # enhanced multi-frame
            groups = per_frame[frame] if per_frame is not None and frame < len(per_frame) else None
            position = _floats(_functional(groups, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
            orientation = _floats(_functional(groups, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            spacing = _floats(_functional(groups, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
            thickness = _float_or(_functional(groups, shared, "PixelMeasuresSequence", "SliceThickness"), None)
            slope = _float_or(_functional(groups, shared, "PixelValueTransformationSequence", "RescaleSlope"), None)
            intercept = _float_or(
                _functional(groups, shared, "PixelValueTransformationSequence", "RescaleIntercept"), None
            )
            frame_index: int | None = frame
        else:
            position = _floats(header.get("ImagePositionPatient"), 3)
            orientation = _floats(header.get("ImageOrientationPatient"), 6)
            spacing = _floats(header.get("PixelSpacing"), 2)
            thickness = _float_or(header.get("SliceThickness"), None)
            slope, intercept = None, None
            frame_index = None if number_of_frames == 1 else frame
        if spacing is not None and min(spacing) <= 0:
            spacing = None  # unusable: the series is skipped as missing_geometry
        if slope is None:
            slope = _rescale(header.get("RescaleSlope"), 1.0, "RescaleSlope", rel_path)
        if intercept is None:
            intercept = _rescale(header.get("RescaleIntercept"), 0.0, "RescaleIntercept", rel_path)
        if series_uid:
            series_key = f"uid:{series_uid}"
        else:
            # Real files with empty UIDs exist (e.g. anonymised PET/CT exports): group by what a series shares.
            rounded_orientation = tuple(round(v, 3) for v in orientation) if orientation else None
            rounded_spacing = tuple(round(v, 4) for v in spacing) if spacing else None
            series_key = "fallback:" + repr(
                (
                    study_key,
                    frame_of_reference,
                    rounded_orientation,
                    rounded_spacing,
                    common["rows"],
                    common["columns"],
                    header.text("SeriesNumber"),
                    modality,
                )
            )
        headers.append(
            SliceHeader(
                frame=frame_index,
                series_key=series_key,
                position=position,
                orientation=orientation,
                pixel_spacing=spacing,
                slice_thickness=thickness,
                slope=float(slope),
                intercept=float(intercept),
                meta=meta,
                **common,
            )
        )
    return headers


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


def _to_hu(stored: np.ndarray, slope: float, intercept: float, where: str) -> np.ndarray:
    """HU = stored * slope + intercept, as int16; refuses values that do not fit rather than wrapping."""
    if slope == 1.0 and float(intercept).is_integer():
        hu = stored.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(stored.astype(np.float64) * slope + intercept)
    low, high = hu.min(initial=0), hu.max(initial=0)
    if low < -32768 or high > 32767:
        raise SeriesSkipped("hu_out_of_range", f"{where}: HU {low}..{high} do not fit int16")
    return hu.astype(np.int16)


def decode_pixels(path: str, transfer_syntax: str = "") -> np.ndarray:
    """Stored pixel values of a file, (frames, rows, columns) or (rows, columns); SeriesSkipped on failure."""
    if transfer_syntax in UNSUPPORTED_SYNTAXES:
        raise SeriesSkipped(
            "unsupported_transfer_syntax", f"no installed decoder for {UNSUPPORTED_SYNTAXES[transfer_syntax]}"
        )
    try:
        ds = pydicom.dcmread(path)
        array = ds.pixel_array
    except NotImplementedError as error:
        raise SeriesSkipped("unsupported_transfer_syntax", str(error).splitlines()[0][:300]) from error
    except Exception as error:
        raise SeriesSkipped("decode_error", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}") from error
    if array.ndim not in (2, 3) or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesSkipped("not_grayscale", f"pixel array of shape {array.shape}; CT must be one sample per pixel")
    if array.dtype.kind == "u" and ds.file_meta.TransferSyntaxUID in JPEG2000TransferSyntaxes:
        array = _j2k_signedness(ds, array)
    return array


def _j2k_signedness(ds: pydicom.Dataset, array: np.ndarray) -> np.ndarray:
    """Trust a signed JPEG 2000 codestream over PixelRepresentation 0: some scanners write signed HU-like
    values with the wrong tag, and reading them unsigned turns -1 into 65535 (pylibjpeg-data
    TOSHIBA_J2K_SIZ1_PixRep0)."""
    try:
        first_frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        params = get_j2k_parameters(first_frame)
    except Exception:  # an unparsable SIZ marker: keep what the decoder returned
        return array
    precision = int(params.get("precision") or ds.BitsStored)
    if not params.get("is_signed") or precision > 16:
        return array
    values = array.astype(np.int32) & ((1 << precision) - 1)
    return np.where(values >= 1 << (precision - 1), values - (1 << precision), values)


def read_slice_hu(header: SliceHeader) -> np.ndarray:
    """HU (rows, columns) int16 of one image plane."""
    if header.pixel_offset >= 0 and header.frame is None:
        # Same values pydicom's native decoder returns (tests compare them), without parsing the header again.
        count = header.rows * header.columns
        array = np.fromfile(header.path, dtype=header.pixel_dtype, count=count, offset=header.pixel_offset)
        if array.size == count:
            return _to_hu(array.reshape(header.rows, header.columns), header.slope, header.intercept, header.rel_path)
    array = decode_pixels(header.path, header.transfer_syntax)
    if header.frame is not None and array.ndim == 3:
        array = array[header.frame]
    elif array.ndim == 3:
        raise SeriesSkipped("decode_error", f"{header.rel_path}: unexpected multi-frame array {array.shape}")
    return _to_hu(array, header.slope, header.intercept, header.rel_path)


def load_series(plan: SeriesPlan) -> Volume:
    """Decode a planned series into a Volume (HU int16, (D, H, W)). Raises SeriesSkipped."""
    rows, columns = plan.slices[0].rows, plan.slices[0].columns
    hu: np.ndarray | None = None  # allocated once a plane matches the header: Rows/Columns may be absurd
    cache: dict[str, np.ndarray] = {}  # multi-frame files decode once
    for k, header in enumerate(plan.slices):
        if header.frame is not None:
            if header.path not in cache:
                cache[header.path] = decode_pixels(header.path, header.transfer_syntax)
            frames = cache[header.path]
            plane = _to_hu(
                frames[header.frame] if frames.ndim == 3 else frames, header.slope, header.intercept, header.rel_path
            )
        else:
            plane = read_slice_hu(header)
        if plane.shape != (rows, columns):
            raise SeriesSkipped("mixed_image_size", f"{header.rel_path}: pixels {plane.shape}, header {rows}x{columns}")
        if hu is None:
            try:
                hu = np.empty((len(plan.slices), rows, columns), dtype=np.int16)
            except MemoryError as error:
                raise SeriesSkipped(
                    "too_large", f"{len(plan.slices)} x {rows} x {columns} int16 voxels do not fit in memory"
                ) from error
        hu[k] = plane
        for duplicate in plan.duplicates[k]:
            if not np.array_equal(read_slice_hu(duplicate), plane):
                raise SeriesSkipped(
                    "duplicate_positions", f"{duplicate.rel_path} and {header.rel_path} share a position but differ"
                )
    if plan.tilt_shift_mm is not None:
        hu = _undo_tilt(hu, plan.tilt_shift_mm, plan.spacing_mm)
    return Volume(
        hu=hu,
        spacing_mm=plan.spacing_mm,
        origin_mm=plan.origin_mm,
        direction=plan.direction,
        case_id=plan.case_id,
        series_id=plan.series_id,
        study_id=plan.study_id,
        frame_of_reference_id=plan.frame_of_reference_id,
        modality="CT",
        meta=dict(plan.meta),
    )


def _undo_tilt(hu: np.ndarray, shift_mm: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Shift slice k in-plane by -shift_mm[k] (linear interpolation) so the volume is no longer sheared; its
    geometry becomes origin + direction @ (i dx, j dy, k dz) with the normal as the third axis."""
    from scipy.ndimage import shift as ndi_shift

    _, dy, dx = spacing_mm
    out = np.empty_like(hu)
    for k in range(hu.shape[0]):
        # Slice k's voxel (j, i) sits at in-plane offset shift_mm[k] from the unsheared grid: sample there.
        # ndimage.shift: out[j] = in[j - shift], and voxel j of slice k lies at unsheared row j + offset.
        offset = (shift_mm[k, 1] / dy, shift_mm[k, 0] / dx)
        out[k] = np.rint(ndi_shift(hu[k].astype(np.float32), offset, order=1, mode="constant", cval=-1024.0)).astype(
            np.int16
        )
    return out


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
