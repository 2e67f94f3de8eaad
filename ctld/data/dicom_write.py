"""Write a `Volume` as a DICOM CT series: one CT Image Storage file per slice, explicit VR little endian.

    paths = write_dicom_series(volume, "out/thin", reference=first_input_dataset, derived=True,
                               series_description="ctld 1 mm")

Geometry follows `ctld.data.volume` exactly: slice k sits at `origin_mm + k * dz * direction[:, 2]`
(ImagePositionPatient), ImageOrientationPatient = `direction[:, 0]` then `direction[:, 1]`, PixelSpacing =
(dy, dx) (DICOM lists row spacing first), SpacingBetweenSlices = dz. Pixels are the HU themselves as signed
int16 (RescaleSlope 1, RescaleIntercept 0), so `ctld.data.dicom.read_dicom_series` reads back the same array.

`reference` (a dataset of the input series) supplies the patient and study attributes, so an inference
output files next to its input in a PACS; the output always gets new Series/SOP Instance UIDs.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctld.data.volume import Volume

# Attributes copied from `reference`: the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) plus
# the frame of reference, which stays valid because the output has the input's geometry.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "Manufacturer",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)


def _ds_value(value: float) -> str:
    """A DS (decimal string) value of at most 16 characters that round-trips float64 closely."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def write_dicom_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    patient: dict | None = None,
    study: dict | None = None,
    reference: pydicom.Dataset | None = None,
    series_description: str = "",
    series_number: int = 1,
    derived: bool = False,
    series_instance_uid: str | None = None,
) -> list[Path]:
    """Write `volume` as one CT Image Storage file per slice into `out_dir` (created if missing).

    Args:
        volume: HU (D, H, W); values are rounded and saturated to int16.
        out_dir: folder for `IM000001.dcm`, ... (one per slice, in increasing position along the normal).
        patient: DICOM keyword -> value for the patient module (e.g. {"PatientName": "PHANTOM^ONE",
            "PatientID": "P001"}); overrides `reference`.
        study: keyword -> value for the study (e.g. {"StudyInstanceUID": uid, "StudyDescription": "demo"});
            series of one study must share the StudyInstanceUID (and FrameOfReferenceUID, if given here).
        reference: a dataset of the input series; its patient/study/frame-of-reference attributes are copied.
        series_description: SeriesDescription; with `derived=True` a note that ctld generated it is added.
        series_number: SeriesNumber.
        derived: ImageType DERIVED\\SECONDARY (a generated series) instead of ORIGINAL\\PRIMARY.
        series_instance_uid: fixed SeriesInstanceUID (default: a new UID).

    Returns:
        The written file paths, slice 0 first.
    """
    hu = np.asarray(volume.hu)
    if hu.ndim != 3 or hu.shape[0] < 1:
        raise ValueError(f"write_dicom_series needs a (D, H, W) volume with D >= 1, got shape {hu.shape}")
    if np.issubdtype(hu.dtype, np.floating):
        hu = np.clip(np.rint(hu), -32768, 32767)
    pixels = hu.astype("<i2", copy=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    dz, dy, dx = volume.spacing_mm
    direction = np.asarray(volume.direction, dtype=np.float64)
    positions = volume.slice_positions_mm()
    now = datetime.datetime.now()

    common = pydicom.Dataset()
    if reference is not None:
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword in reference:
                setattr(common, keyword, reference[keyword].value)
    for values in (patient or {}, study or {}):
        for keyword, value in values.items():
            setattr(common, keyword, value)
    for keyword, default in (
        ("PatientName", "ANONYMOUS"),
        ("PatientID", volume.case_id[:64] or "ANONYMOUS"),
        ("StudyInstanceUID", None),
        ("StudyDate", now.strftime("%Y%m%d")),
        ("StudyTime", now.strftime("%H%M%S")),
        ("StudyID", "1"),
        ("AccessionNumber", ""),
        ("ReferringPhysicianName", ""),
        ("FrameOfReferenceUID", None),
        ("PositionReferenceIndicator", ""),
    ):
        if keyword not in common or (default is None and not common[keyword].value):
            setattr(common, keyword, default if default is not None else generate_uid())

    series_uid = series_instance_uid or generate_uid()
    description = series_description
    if derived:
        note = "generated by ctld (not acquired)"
        description = f"{series_description} ({note})" if series_description else note
    window_center, window_width = (40, 400)

    paths = []
    for k in range(pixels.shape[0]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM{k + 1:06d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(common)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = volume.modality or "CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if derived else ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = description[:64]
        ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesTime = now.strftime("%H%M%S")
        ds.ContentDate = ds.SeriesDate
        ds.ContentTime = ds.SeriesTime
        ds.InstanceNumber = k + 1
        if derived:
            ds.DerivationDescription = "Slice interpolation by ctld (3D latent diffusion)"
        ds.ImagePositionPatient = [_ds_value(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds_value(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.SliceLocation = _ds_value(float(positions[k] @ direction[:, 2]))
        ds.PixelSpacing = [_ds_value(dy), _ds_value(dx)]
        ds.SliceThickness = _ds_value(float(volume.meta.get("slice_thickness_mm", dz)))
        ds.SpacingBetweenSlices = _ds_value(dz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = window_center
        ds.WindowWidth = window_width
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        tmp = path.with_name(path.name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths
