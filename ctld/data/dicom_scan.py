"""Headers of one DICOM file -> one `SliceHeader` per image plane, without decoding pixels.

    scan_file(path, rel_path) -> list[SliceHeader]     one per image plane (enhanced multi-frame CT: one per frame)

Only the header is read (`stop_before_pixels`), through `_RawHeader`, which reads raw element bytes instead of
converting every value. For uncompressed 16-bit little endian files the pixel offset is recorded, so
`ctld.data.dicom_pixels` can read the values with numpy alone. HU = stored * RescaleSlope + RescaleIntercept; a
present but unusable RescaleSlope/Intercept skips the file rather than guessing. SeriesInstanceUID may be empty,
so the series key then falls back to study, frame of reference, orientation, pixel spacing, size and series
number.

Identifiers (patient id, UIDs) live only in memory in `SliceHeader`; `ctld.data.dicom` turns them into salted
hashes before anything is written or logged. `SeriesSkipped` lives here, the lowest of the DICOM modules, so every
step can raise it without an import cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

# Transfer syntaxes no installed pixel-data plugin decodes: retired JPEG spectral selection / progressive.
UNSUPPORTED_SYNTAXES = {
    "1.2.840.10008.1.2.4.53": "JPEG Spectral Selection, Non-Hierarchical (retired)",
    "1.2.840.10008.1.2.4.55": "JPEG Full Progression, Non-Hierarchical (retired)",
}
CT_STORAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


class SeriesSkipped(Exception):
    """A file or series that cannot become a Volume; `reason` is a short stable name, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        detail = " ".join(detail.split())  # one line: a decoder's message (nibabel's, pydicom's) may hold newlines
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
NATIVE_SYNTAXES = {*NATIVE_LITTLE_ENDIAN, "1.2.840.10008.1.2.2"}  # uncompressed pixel data


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
    # A damaged NumberOfFrames would plan a million planes from one file: every frame needs its pixels in the file
    # (all of them uncompressed; at least a byte compressed).
    native = transfer_syntax in NATIVE_SYNTAXES
    bits = int(_float_or(header.get("BitsAllocated"), 16) or 16) if native else 8
    frame_bytes = max(1, common["rows"] * common["columns"] * max(bits, 8) // 8) if native else 1
    file_bytes = os.path.getsize(path)
    if number_of_frames > 1 and number_of_frames * frame_bytes > file_bytes:
        raise SeriesSkipped("bad_frame_count", f"NumberOfFrames {number_of_frames} of {common['rows']}x"
                            f"{common['columns']} pixels cannot fit in the file's {file_bytes} bytes")
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
