"""`Volume`: one CT series in memory, the contract between readers, the shard builder and inference.

Geometry (docs/DESIGN.md, Volumes): `hu` is (D, H, W) int16, D along the slice normal in increasing position.
The world (patient LPS, mm) position of voxel index (k, j, i) = (slice, row, column) is

    origin_mm + direction @ (i * dx, j * dy, k * dz)        with spacing_mm = (dz, dy, dx)

so `direction[:, 0]` is the row direction cosine of DICOM ImageOrientationPatient (along columns, i),
`direction[:, 1]` the column direction cosine (along rows, j) and `direction[:, 2]` the slice normal.
This is ITK's convention with the index order reversed to numpy's (D, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    hu: np.ndarray  # (D, H, W) int16 Hounsfield units
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]  # LPS position of voxel (0, 0, 0)
    direction: np.ndarray  # (3, 3) float64, columns = LPS unit vectors of the x (W), y (H), z (D) axes
    case_id: str = ""  # salted hash of the patient
    series_id: str = ""  # salted hash of the series
    study_id: str = ""  # salted hash of the study (pairs thick and thin series)
    frame_of_reference_id: str = ""  # salted hash of FrameOfReferenceUID ("" when absent)
    modality: str = "CT"
    meta: dict = field(default_factory=dict)  # non-identifying extras (manufacturer, kernel, source kind)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must be (D, H, W), got shape {self.hu.shape}")
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(o) for o in self.origin_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) voxel indices (x, y, z order) to LPS mm."""
        dz, dy, dx = self.spacing_mm
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.array([dx, dy, dz])[None, :]
        affine[:3, 3] = self.origin_mm
        return affine

    def slice_positions_mm(self) -> np.ndarray:
        """(D, 3) LPS position of each slice's first voxel (DICOM ImagePositionPatient)."""
        k = np.arange(self.hu.shape[0])[:, None]
        return np.asarray(self.origin_mm)[None, :] + k * self.spacing_mm[0] * self.direction[:, 2][None, :]
