"""Headers of one DICOM file -> one `SliceHeader` per image plane, without decoding pixels.

    scan_file(path, rel_path) -> list[SliceHeader]     one per image plane (enhanced multi-frame CT: one per frame)

Only the header is read. Little endian files with a preamble (nearly all) go through `_fast_header`, a minimal
element walker that keeps the raw bytes of the top-level elements and stops at the pixel data (a pydicom `dcmread`
costs as much as the rest of the shard build per file); anything it does not handle (big endian, deflate, no
preamble, enhanced multi-frame, odd VRs) goes through pydicom (`stop_before_pixels`) and `_RawHeader`, which reads
raw element bytes instead of converting every value. Both give the same SliceHeaders (tests compare them on the
real CT files). For uncompressed 16-bit little endian files the pixel offset is recorded, so
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
import struct
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


def _native_pixel_offset(path, ds, transfer_syntax: str, offset: int, head: bytes = b"") -> int:
    """Byte offset of the pixel values when they can be read straight from the file (uncompressed little
    endian, one 16-bit frame, no unused high bits to sign-extend), else -1 (decode with pydicom). `head`: the
    file's first bytes when already read."""
    explicit = NATIVE_LITTLE_ENDIAN.get(transfer_syntax)
    if explicit is None or int(_float_or(ds.get("NumberOfFrames", 1), 1) or 1) != 1 or ds.get("BitsAllocated") != 16:
        return -1
    if int(ds.get("SamplesPerPixel", 1)) != 1 or (ds.get("PixelRepresentation") == 1 and ds.get("BitsStored") != 16):
        return -1
    element = head[offset : offset + 12]
    if len(element) < 12:
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
        return _raw_value(keyword, element.value, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.ds

    def text(self, keyword: str) -> str:
        value = self.get(keyword, "")
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = "\\".join(str(v) for v in value)
        return str(value).strip()


def _raw_value(keyword: str, value: bytes | None, default):
    """A little endian raw element's value: US as int, text (split on backslashes when multi-valued)."""
    if value is None:
        return default
    if keyword in _US_KEYWORDS:
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else default
    text = value.decode("latin-1").strip(" \x00")
    return text.split("\\") if "\\" in text else text


class _FastHeader(_RawHeader):
    """`_RawHeader`'s view of the top-level elements `_fast_header` found: {tag: raw value bytes}."""

    def __init__(self, elements: dict[int, bytes]):
        self.elements = elements

    def __contains__(self, keyword: str) -> bool:
        return tag_for_keyword(keyword) in self.elements

    def get(self, keyword: str, default=None):
        return _raw_value(keyword, self.elements.get(tag_for_keyword(keyword)), default)


class _Unhandled(Exception):
    """Something `_fast_header` leaves to pydicom."""


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
              b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}  # where pydicom's stop_before_pixels stops
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Enhanced multi-frame: values sit in sequences, which pydicom reads.
_FUNCTIONAL_GROUPS = {0x52009229, 0x52009230}
_U16x2 = struct.Struct("<HH")
_U32 = struct.Struct("<I")


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value position) of the element at `pos`."""
    if pos + 8 > len(data):
        raise _Unhandled("past the end")
    group, number = _U16x2.unpack_from(data, pos)
    tag = group << 16 | number
    if implicit or group == 0xFFFE:  # items and delimiters never carry a VR
        return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _SHORT_VRS:
        return tag, vr, int.from_bytes(data[pos + 6 : pos + 8], "little"), pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unhandled("past the end")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    raise _Unhandled(f"VR {vr!r}")  # unknown VR or an implicit element in an explicit file: pydicom guesses


def _skip_sequence(data: bytes, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence whose items start at `pos`."""
    while True:
        tag, _, length, pos = _element(data, pos, True)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unhandled(f"tag {tag:08x} in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, vr, length, value = _element(data, pos, implicit)
            if tag == _ITEM_END:
                pos = value
                break
            # A UN of undefined length holds implicit VR little endian data (PS3.5 6.2.2).
            pos = _skip_sequence(data, value, implicit or vr == b"UN") if length == _UNDEFINED else value + length


def _walk(data: bytes, pos: int, implicit: bool, stop_group: int | None) -> tuple[dict[int, bytes], int]:
    """Top-level elements from `pos` up to the pixel data (or the first element outside `stop_group`, the end of
    the data): ({tag: value bytes}, the offset where reading stopped); sequences are skipped, not kept."""
    elements: dict[int, bytes] = {}
    while pos < len(data):
        if stop_group is not None and int.from_bytes(data[pos : pos + 2], "little") != stop_group:
            return elements, pos  # (before reading a VR: the next group may be encoded otherwise)
        tag, vr, length, value = _element(data, pos, implicit)
        if tag in _PIXEL_TAGS:
            return elements, pos
        if tag in _FUNCTIONAL_GROUPS:
            raise _Unhandled("enhanced multi-frame")
        if length == _UNDEFINED:
            pos = _skip_sequence(data, value, implicit or vr == b"UN")
            continue
        if value + length > len(data):
            raise _Unhandled("past the end")
        if vr != b"SQ":
            elements[tag] = data[value : value + length]
        pos = value + length
    return elements, pos


def _fast_header(path) -> tuple[_FastHeader, int, str, bytes] | None:
    """(header, offset of the pixel data element (or the file end), transfer syntax, the bytes read) of a little
    endian DICOM file with a preamble, reading ~64 KiB; None for anything left to pydicom."""
    with open(path, "rb") as fp:
        data = fp.read(1 << 16)
        whole = len(data) < 1 << 16
        for _ in range(2):
            try:
                if data[128:132] != b"DICM":
                    return None
                meta, pos = _walk(data, 132, implicit=False, stop_group=0x0002)
                transfer_syntax = meta.get(0x00020010, b"").decode("latin-1").strip(" \x00")
                if transfer_syntax in ("", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
                    return None  # no syntax (pydicom guesses), big endian, deflated
                implicit = transfer_syntax == "1.2.840.10008.1.2"
                if implicit and data[pos + 4 : pos + 6] in _SHORT_VRS | _LONG_VRS:
                    return None  # says implicit, is explicit: pydicom detects that
                elements, stop = _walk(data, pos, implicit, stop_group=None)
                return _FastHeader(elements), stop, transfer_syntax, data
            except _Unhandled:
                if whole:
                    return None
                data += fp.read()  # a header longer than the first read: once more with the whole file
                whole = True
    return None


def scan_file(path: str | os.PathLike, rel_path: str, *, fast: bool = True) -> list[SliceHeader]:
    """Image planes of one file. Raises SeriesSkipped for files that hold no usable CT image. `fast=False` reads
    every header with pydicom (what the fast reader is tested against)."""
    try:
        fast_read = _fast_header(path) if fast else None
    except OSError:
        fast_read = None  # pydicom's reader names the problem
    if fast_read is None:
        ds, stop_offset = read_header(path)
        transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        header, head = _RawHeader(ds, transfer_syntax != "1.2.840.10008.1.2.2"), b""
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    else:
        header, stop_offset, transfer_syntax, head = fast_read
        shared = None
    if "Rows" not in header or "Columns" not in header:
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
        pixel_offset=_native_pixel_offset(path, header, transfer_syntax, stop_offset, head),
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
