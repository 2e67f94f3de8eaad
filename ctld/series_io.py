"""Reading a CT series for inference or evaluation, and writing the thin series: one set of functions for
`ctld-infer` and `ctld-eval`.

    volume, reference, kind = read_input("thick_series/")            # exactly one series, refused if irregular
    thin = thin_volume_like(volume, thin_hu, factor=5)                # the thin grid of docs/DESIGN.md
    write_output(thin, "thin/", "dicom", reference=reference)         # a new folder, renamed into place
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctld.data.geometry import thin_origin_mm
from ctld.data.transforms import hu_to_int16
from ctld.data.volume import Volume


def read_series(path: str | Path, *, salt: str = "", strict: bool = False, with_reference: bool = False) -> list:
    """Every CT series of a DICOM folder/ZIP or NIfTI file, as Volumes (or (Volume, reference dataset) pairs).

    Series are read as they are, never repaired by interpolation (an output must sit on the input's own grid
    and a target must be real): missing slices, non-uniform spacing and gantry tilt skip the series (`strict`:
    raise ValueError naming it); duplicate positions are dropped. Short series (2+ slices) are fine: a 5 mm chest
    CT of a child has about 30 slices.
    """
    from ctld.data.dicom import Policy, read_dicom_series
    from ctld.data.nifti import is_nifti, read_nifti

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; pass a DICOM folder or ZIP, or a NIfTI file")
    if is_nifti(path):
        volume = read_nifti(path, salt)
        return [(volume, None)] if with_reference else [volume]
    policy = Policy(min_slices=2, on_duplicate_positions="repair", on_missing_slices="skip",
                    on_nonuniform_spacing="skip", on_gantry_tilt="skip")
    found = read_dicom_series(path, salt=salt, policy=policy, strict=strict, with_reference=with_reference)
    if not found:
        raise ValueError(f"{path}: no readable CT series (see the warnings above for skipped ones)")
    return found


def read_input(path: str | Path, *, series_id: str = "", salt: str = ""):
    """One thick series from a DICOM folder/ZIP or a NIfTI file -> (Volume, reference dataset or None, kind)."""
    from ctld.data.nifti import is_nifti

    if is_nifti(Path(path)):
        return read_series(path, salt=salt)[0], None, "nifti"
    found = read_series(path, salt=salt, strict=True, with_reference=True)
    if series_id:
        found = [pair for pair in found if pair[0].series_id == series_id]
    if not found:
        raise ValueError(f"{path}: no readable CT series" + (f" with series id {series_id}" if series_id else ""))
    if len(found) > 1:
        listing = "; ".join(f"{v.series_id}: {v.shape[0]} slices at {v.spacing_mm[0]:.2f} mm" for v, _ in found)
        raise ValueError(f"{path} holds {len(found)} CT series ({listing}); pick one with --series_id")
    volume, reference = found[0]
    return volume, reference, "dicom"


def write_output(thin: Volume, out: str | Path, fmt: str, *, reference=None, stem: str = "thin") -> list[Path]:
    """Write the thin volume as a DICOM series folder and/or a NIfTI file; returns what was written."""
    from ctld.data.dicom_write import write_dicom_series
    from ctld.data.nifti import is_nifti, write_nifti

    out = Path(out)
    written = []
    if fmt in ("nifti", "both"):
        nifti_path = out if (fmt == "nifti" and is_nifti(out)) else out / f"{stem}.nii.gz"
        written.append(write_nifti(thin, nifti_path))
    if fmt in ("dicom", "both"):
        dicom_dir = out if fmt == "dicom" else out / "dicom"
        if dicom_dir.exists() and any(dicom_dir.iterdir()):
            raise FileExistsError(f"DICOM output folder {dicom_dir} is not empty; pass a new folder")
        # Write into a temporary sibling and rename, so a PACS watcher never sees half a series.
        tmp = dicom_dir.with_name(f".{dicom_dir.name}.tmp-ctld")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        number = int(getattr(reference, "SeriesNumber", 0) or 0) + 1000 if reference is not None else 1000
        source = str(getattr(reference, "SeriesDescription", "") or "") if reference is not None else ""
        description = f"ctld {thin.spacing_mm[0]:.3g}mm" + (f" from {source}" if source else "")
        write_dicom_series(thin, tmp, reference=reference, derived=True, series_description=description[:29],
                           series_number=number)
        if dicom_dir.exists():
            dicom_dir.rmdir()
        dicom_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dicom_dir)
        written.append(dicom_dir)
    return written


def thin_volume_like(thick: Volume, thin_hu: np.ndarray, factor: int) -> Volume:
    """The thin Volume on the grid of docs/DESIGN.md: spacing dz / factor, origin shifted by -(factor - 1) / 2 thin
    spacings along the normal, the thick series' in-plane grid, orientation and ids."""
    dz, dy, dx = thick.spacing_mm
    thin_dz = dz / factor
    origin = thin_origin_mm(thick.origin_mm, dz, thick.direction, factor)
    if thin_hu.shape != (thick.shape[0] * factor, *thick.shape[1:]):
        raise ValueError(f"thin volume of shape {thin_hu.shape} does not fit thick {thick.shape} x factor {factor}")
    return Volume(
        hu=hu_to_int16(thin_hu),
        spacing_mm=(thin_dz, dy, dx),
        origin_mm=tuple(origin),
        direction=thick.direction,
        case_id=thick.case_id,
        study_id=thick.study_id,
        frame_of_reference_id=thick.frame_of_reference_id,
        modality=thick.modality,
        meta={"slice_thickness_mm": thin_dz, "source": "ctld", "factor": factor},
    )
