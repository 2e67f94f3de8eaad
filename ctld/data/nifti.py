"""NIfTI volumes (nibabel) and preprocessed-cache volumes (.npy / .pt + JSON sidecar) as `Volume`s.

NIfTI stores RAS+ world coordinates and (i, j, k) = (x, y, z) array order; `Volume` is LPS with (D, H, W) =
(k, j, i) order, so reading flips the sign of the first two world axes and transposes the array.

Preprocessed cache: one volume per case, `<name>.npy` or `<name>.pt` (a tensor, read with
`torch.load(weights_only=True)`, never unpickled), next to `<name>.json`:

    {"spacing_mm": [dz, dy, dx],                       required
     "origin_mm": [x, y, z], "direction": 3x3,         optional: LPS geometry (default: origin 0, identity)
     "rescale_slope": 1.0, "rescale_intercept": 0.0,   optional: HU = stored * slope + intercept
     "patient": "...", "study": "..."}                 optional: identifiers, only ever stored as salted hashes

The array is (D, H, W) (a leading 1 is dropped). Without "patient", the relative path (no suffix) identifies the
patient, as it does for NIfTI files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ctld.data.dicom import SeriesSkipped, anon_id
from ctld.data.geometry import grid_problem
from ctld.data.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CACHE_SUFFIXES = (".npy", ".pt")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_cache_volume(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.suffix.lower() in CACHE_SUFFIXES and path.with_suffix(".json").is_file()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npy", ".pt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def volume_ids(path: str | os.PathLike, rel_path: str, salt: str) -> tuple[str, str, str]:
    """(case_id, series_id, study_id) of a NIfTI or cache file, from its relative path (without suffix) and, for
    cache files, the sidecar's "patient"/"study"; cheap (reads no voxels), so the shard builder can plan with it."""
    identity = str(Path(rel_path).parent / _stem(Path(rel_path)))
    patient = study = identity
    sidecar = Path(path).with_suffix(".json")
    if Path(path).suffix.lower() in CACHE_SUFFIXES and sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            info = {}
        patient = str(info.get("patient") or identity)
        study = str(info.get("study") or patient)
    return (
        anon_id(patient, salt, "patient"),
        anon_id(f"{study}|{identity}", salt, "series"),
        anon_id(study, salt, "study"),
    )


def _to_int16_hu(values: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise SeriesSkipped("nonfinite_values", f"{where}: NaN or infinite voxels")
        values = np.rint(values)
    low, high = values.min(initial=0), values.max(initial=0)
    if low < -32768 or high > 32767:
        raise SeriesSkipped("hu_out_of_range", f"{where}: values {low}..{high} do not fit int16 HU")
    return values.astype(np.int16)


def _on_orthogonal_grid(hu: np.ndarray, spacing_mm, origin_mm, direction, where: str):
    """(hu, spacing_mm, origin_mm, direction) of a volume read from an affine or a sidecar, on the grid a Volume
    holds: orthogonal and right-handed. A left-handed grid (slices running against x cross y, as a NIfTI with a
    flipped axis has) is reordered, as DICOM slices are sorted along the normal; anything else that is not an
    orthogonal grid (shear from a tilted gantry, non-orthonormal in-plane axes, spacing <= 0) is skipped with the
    reason DICOM gets for it (`geometry.grid_problem`), never read as if it were orthogonal."""
    problem = grid_problem(direction, spacing_mm)
    if problem is not None and problem[0] == "left_handed":
        direction = np.array(direction, dtype=np.float64)
        origin_mm = np.asarray(origin_mm, dtype=np.float64) + (hu.shape[0] - 1) * float(spacing_mm[0]) * direction[:, 2]
        direction[:, 2] *= -1
        hu = np.ascontiguousarray(hu[::-1])
        problem = grid_problem(direction, spacing_mm)
    if problem is not None:
        raise SeriesSkipped(problem[0], f"{where}: {problem[1]}")
    return hu, tuple(float(v) for v in spacing_mm), tuple(float(v) for v in origin_mm), np.asarray(direction)


def read_nifti(path: str | os.PathLike, salt: str = "", *, rel_path: str | None = None) -> Volume:
    """A NIfTI CT volume (HU after scl_slope/scl_inter) as a Volume; ids are salted hashes of `rel_path`
    (default: the file name), since NIfTI has no patient attributes."""
    import nibabel as nib

    path = Path(path)
    rel_path = rel_path or path.name
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter
    except Exception as error:
        raise SeriesSkipped("unreadable_nifti", f"{rel_path}: {type(error).__name__}: {error}") from error
    data = np.squeeze(data)
    if data.ndim != 3 or data.size == 0:
        raise SeriesSkipped("not_3d", f"{rel_path}: NIfTI data of shape {data.shape}, expected 3D with voxels")
    affine_lps = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)[:3, :4]
    columns = affine_lps[:, :3]
    spacing_xyz = np.linalg.norm(columns, axis=0)
    if not np.isfinite(affine_lps).all() or np.any(spacing_xyz <= 0):
        raise SeriesSkipped("missing_geometry", f"{rel_path}: singular or non-finite affine")
    direction = columns / spacing_xyz
    hu = np.ascontiguousarray(np.transpose(_to_int16_hu(data, rel_path), (2, 1, 0)))  # (x, y, z) -> (D, H, W)
    # A column's norm is the spacing along that axis: with a shear it is not the distance between slices, which
    # is why a sheared affine is refused here rather than read with that spacing.
    hu, spacing_mm, origin_mm, direction = _on_orthogonal_grid(
        hu, spacing_xyz[::-1], affine_lps[:, 3], direction, rel_path)
    case_id, series_id, study_id = volume_ids(path, rel_path, salt)
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        origin_mm=origin_mm,
        direction=direction,
        case_id=case_id,
        series_id=series_id,
        study_id=study_id,
        frame_of_reference_id="",
        meta={"source": "nifti", "slice_thickness_mm": float(spacing_xyz[2])},
    )


def write_nifti(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a Volume as NIfTI-1 (int16, RAS+ affine, `.nii` or `.nii.gz`), atomically (temp file + rename).
    An existing file is refused (FileExistsError), as DICOM output refuses a non-empty folder, unless
    `overwrite`."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: NIfTI output must end in .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"NIfTI output {path} already exists; pass a new path (it is not replaced)")
    affine = np.eye(4)
    affine[:3, :4] = RAS_TO_LPS @ volume.affine_lps()[:3, :4]
    data = np.transpose(np.asarray(volume.hu, dtype=np.int16), (2, 1, 0))  # (D, H, W) -> (x, y, z)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    tmp = path.with_name(path.name + ".tmp" + suffix)
    nib.save(image, str(tmp))
    if overwrite:
        os.replace(tmp, path)
    else:
        try:  # a file that appeared since the check above is not replaced either
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"NIfTI output {path} already exists; pass a new path (it is not replaced)") from None
        except OSError:  # a file system without hard links (some network mounts): rename after the check above
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def read_cached_volume(path: str | os.PathLike, salt: str = "", *, rel_path: str | None = None) -> Volume:
    """A preprocessed-cache volume (`.npy` or `.pt` + `.json` sidecar, see the module docstring)."""
    path = Path(path)
    rel_path = rel_path or path.name
    sidecar = path.with_suffix(".json")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise SeriesSkipped("bad_sidecar", f"{rel_path}: cannot read {sidecar.name}: {error}") from error
    if not isinstance(info, dict) or not isinstance(info.get("spacing_mm"), list) or len(info["spacing_mm"]) != 3:
        raise SeriesSkipped("bad_sidecar", f'{rel_path}: {sidecar.name} needs "spacing_mm": [dz, dy, dx]')
    try:
        if path.suffix.lower() == ".pt":
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise ValueError(f"expected one tensor, got {type(loaded).__name__}")
            array = loaded.numpy()
        else:
            array = np.load(path, allow_pickle=False)
    except Exception as error:
        raise SeriesSkipped("unreadable_cache", f"{rel_path}: {type(error).__name__}: {error}") from error
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.size == 0:
        raise SeriesSkipped("not_3d", f"{rel_path}: array of shape {array.shape}, expected (D, H, W) with voxels")
    try:
        slope = float(info.get("rescale_slope", 1.0))
        intercept = float(info.get("rescale_intercept", 0.0))
    except (TypeError, ValueError) as error:
        raise SeriesSkipped("bad_rescale", f"{rel_path}: {sidecar.name} rescale is not a number: {error}") from error
    if slope != 1.0 or intercept != 0.0:
        array = array.astype(np.float64) * slope + intercept
    try:
        spacing_mm = np.asarray(info["spacing_mm"], dtype=np.float64).reshape(3)
        origin_mm = np.asarray(info.get("origin_mm", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(3)
        direction = np.asarray(info.get("direction", np.eye(3)), dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError) as error:
        raise SeriesSkipped("bad_sidecar", f"{rel_path}: {sidecar.name} geometry is not numeric: {error}") from error
    hu, spacing_mm, origin_mm, direction = _on_orthogonal_grid(
        np.ascontiguousarray(_to_int16_hu(array, rel_path)), spacing_mm, origin_mm, direction, rel_path)
    case_id, series_id, study_id = volume_ids(path, rel_path, salt)
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        origin_mm=origin_mm,
        direction=direction,
        case_id=case_id,
        series_id=series_id,
        study_id=study_id,
        frame_of_reference_id="",
        meta={"source": "cache", "slice_thickness_mm": spacing_mm[0]},
    )
