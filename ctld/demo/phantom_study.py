"""Phantom studies on disk: one phantom as a DICOM study with fake patient identifiers (`write_study`), a
seeded cohort of them with a `phantoms.json` record (`make_cohort`), and the command line

    python -m ctld.demo.phantom demo_out/phantoms --n_studies 8 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ctld.demo.phantom import Phantom

logger = logging.getLogger(__name__)


@dataclass
class PhantomStudy:
    """Where one phantom study was written."""

    index: int
    patient_name: str
    study_dir: Path
    thin_dir: Path
    thick_dir: Path | None
    seed: int
    findings: list[dict]


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["ctld-phantom", *(str(p) for p in parts)])


def write_study(
    phantom: Phantom,
    out_dir: str | os.PathLike,
    *,
    index: int,
    with_thick: bool,
    factor: int = 5,
) -> PhantomStudy:
    """Write `phantom` as a thin DICOM series (and a thick one of the same acquisition) under
    `out_dir/PHANTOM_<index>/`. Patient and study attributes are fake but look real, on purpose."""
    from ctld.data.dicom_write import write_dicom_series
    from ctld.demo.phantom import thick_volume  # imported here: ctld.demo.phantom re-exports this module

    name = f"PHANTOM^{index:03d}"
    study_dir = Path(out_dir) / f"PHANTOM_{index:03d}"
    patient = {
        "PatientName": name,
        "PatientID": f"PH{index:06d}",
        "PatientBirthDate": f"2016{(index % 12) + 1:02d}15",
        "PatientSex": "MF"[index % 2],
        "PatientAge": "009Y",
    }
    study = {
        "StudyInstanceUID": _uid(phantom.seed, index, "study"),
        "FrameOfReferenceUID": _uid(phantom.seed, index, "frame"),
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "StudyID": f"{index}",
        "StudyDescription": "CTLD PHANTOM CHEST CTPA",
        "AccessionNumber": f"ACC{index:07d}",
        "InstitutionName": "CTLD Phantom Children's Hospital",
        "ReferringPhysicianName": "DOE^JANE",
        "Manufacturer": "ctld phantom",
    }
    thin = phantom.volume()
    thin_dir = study_dir / "thin_1mm"
    write_dicom_series(
        thin,
        thin_dir,
        patient=patient,
        study=study,
        series_description=f"CHEST {thin.spacing_mm[0]:g}mm",
        series_number=2,
        series_instance_uid=_uid(phantom.seed, index, "thin"),
    )
    thick_dir = None
    if with_thick:
        thick = thick_volume(thin, factor)
        thick_dir = study_dir / f"thick_{thick.spacing_mm[0]:g}mm"
        write_dicom_series(
            thick,
            thick_dir,
            patient=patient,
            study=study,
            series_description=f"CHEST {thick.spacing_mm[0]:g}mm",
            series_number=3,
            series_instance_uid=_uid(phantom.seed, index, "thick"),
        )
    return PhantomStudy(index, name, study_dir, thin_dir, thick_dir, phantom.seed, phantom.findings)


def make_cohort(
    out_dir: str | os.PathLike,
    n_studies: int,
    seed: int,
    *,
    thick_fraction: float = 0.5,
    factor: int = 5,
    first_index: int = 1,
    **phantom_kwargs,
) -> list[PhantomStudy]:
    """Generate `n_studies` phantoms and write them as DICOM studies under `out_dir`, plus `phantoms.json`.

    Args:
        out_dir: one `PHANTOM_<index>/` folder per study (thin_1mm/ and, for some, thick_5mm/).
        n_studies: how many studies.
        seed: cohort seed; study i uses its own seed drawn from it, so studies differ and reruns match.
        thick_fraction: fraction of studies that also get a thick series (spread evenly over the cohort).
        factor: thick / thin spacing.
        first_index: index (and patient name number) of the first study.
        phantom_kwargs: passed to `make_phantom` (num_slices, size, pixel_spacing_mm, noise_hu, ...).
    """
    from ctld.demo.phantom import make_phantom  # imported here: ctld.demo.phantom re-exports this module

    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if not 0.0 <= thick_fraction <= 1.0:
        raise ValueError(f"thick_fraction must be in [0, 1], got {thick_fraction}")
    out_dir = Path(out_dir)
    seeds = np.random.SeedSequence(seed).generate_state(n_studies)
    studies = []
    for n in range(n_studies):
        with_thick = math.ceil((n + 1) * thick_fraction) > math.ceil(n * thick_fraction)  # the first one has it
        phantom = make_phantom(int(seeds[n]), **phantom_kwargs)
        studies.append(write_study(phantom, out_dir, index=first_index + n, with_thick=with_thick, factor=factor))
        logger.info("phantom study %d/%d written to %s", n + 1, n_studies, studies[-1].study_dir)
    record = [
        {
            "index": study.index,
            "study_dir": study.study_dir.name,
            "thin_dir": str(study.thin_dir.relative_to(out_dir)),
            "thick_dir": str(study.thick_dir.relative_to(out_dir)) if study.thick_dir else None,
            "seed": study.seed,
            "findings": study.findings,
        }
        for study in studies
    ]
    tmp = out_dir / "phantoms.json.tmp"
    tmp.write_text(json.dumps({"cohort_seed": seed, "phantom": phantom_kwargs, "studies": record}, indent=1))
    tmp.replace(out_dir / "phantoms.json")
    return studies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctld.demo.phantom",
        description="Write a cohort of procedural chest CT phantoms as DICOM studies (thin 1 mm, some thick 5 mm).",
    )
    parser.add_argument("out_dir", help="folder for PHANTOM_<n>/ study folders and phantoms.json")
    parser.add_argument("--n_studies", type=int, default=8, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--num_slices", type=int, default=100, help="thin slices per study")
    parser.add_argument("--size", type=int, default=128, help="rows = columns")
    parser.add_argument("--pixel_spacing_mm", type=float, default=1.5, help="in-plane pixel spacing")
    parser.add_argument("--noise_hu", type=float, default=15.0, help="noise standard deviation in the body")
    parser.add_argument("--thick_fraction", type=float, default=0.5, help="fraction of studies with a thick series")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    studies = make_cohort(
        args.out_dir,
        args.n_studies,
        args.seed,
        thick_fraction=args.thick_fraction,
        num_slices=args.num_slices,
        size=args.size,
        pixel_spacing_mm=args.pixel_spacing_mm,
        noise_hu=args.noise_hu,
    )
    print(f"wrote {len(studies)} phantom studies to {args.out_dir}")
    return 0
