"""Pixels of planned DICOM slices -> HU volume: decode, rescale to int16 HU, undo a gantry tilt.

    read_slice_hu(header)  -> HU (rows, columns) int16 of one image plane
    load_series(plan)      -> Volume                decode + HU of a `ctld.data.dicom.SeriesPlan`

Uncompressed 16-bit planes whose offset `scan_file` recorded are read with numpy; everything else goes through
pydicom's decoders. HU = stored * RescaleSlope + RescaleIntercept, refused (not wrapped) when it does not fit int16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000TransferSyntaxes

from ctld.data.dicom_scan import UNSUPPORTED_SYNTAXES, SeriesSkipped, SliceHeader
from ctld.data.volume import Volume

if TYPE_CHECKING:  # only for annotations: ctld.data.dicom imports this module
    from ctld.data.dicom import SeriesPlan


def _to_hu(stored: np.ndarray, slope: float, intercept: float, where: str) -> np.ndarray:
    """HU = stored * slope + intercept, as int16; refuses values that do not fit rather than wrapping."""
    exact_integer = slope == 1.0 and float(intercept).is_integer() and abs(intercept) < 2**31
    if exact_integer and stored.size and stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        # The range from the stored extremes, then one 16-bit add, which wraps to the right value whenever the
        # result fits (checked first): no 32-bit copy of every plane in the shard builder's inner loop.
        low, high = int(stored.min()) + int(intercept), int(stored.max()) + int(intercept)
        if low < -32768 or high > 32767:
            raise SeriesSkipped("hu_out_of_range", f"{where}: HU {low}..{high} do not fit int16")
        native16 = stored.dtype.itemsize == 2 and stored.dtype.isnative  # (a big endian array must be converted)
        planes = stored.view(np.int16) if native16 else stored.astype(np.int16)
        return np.add(planes, np.array(int(intercept)).astype(np.int16), dtype=np.int16)
    if exact_integer:
        hu = stored.astype(np.int64) + int(intercept)
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
