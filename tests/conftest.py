"""Shared fixtures. Fixtures that build data (DICOM series, shards) live here so every test module reuses them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ctld.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Subprocesses (accelerate launch, DeepSpeed's JIT build) must use this environment's tools: with the system's
# ninja first on PATH in some tests and the venv's in others, the two ninja versions disagree about the build
# log and DeepSpeed's CPU comm op is rebuilt (~90 s) every time the other one ran.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# Builds without shards.salt keep a random salt per user (ctld.data.salt.default_salt_file); tests keep
# theirs in a folder of their own, never in the real ~/.config/ctld.
os.environ["CTLD_SALT_FILE"] = str(Path(tempfile.mkdtemp(prefix="ctld-test-salt-")) / "salt")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "ct"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """../shared/data/ct: real public CT files. Absent in a user's clone, so tests that need it skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT test data not found at {SHARED_DATA} (it sits beside the repo in CI only)")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(REPO_ROOT / "configs" / "tiny.yaml")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic DICOM and shards (issue 3). Session-scoped: written once per test session, shared by every module.
# Identifying strings below are fake on purpose: tests grep shards and manifests for them.

SYNTH_PATIENTS = {
    # name: (PatientName, PatientID, series built for that patient)
    "pair": ("SYNTH^PAIRPATIENT", "SYNTHID-PAIR-0001", "thin+thick"),
    "thin": ("SYNTH^THINPATIENT", "SYNTHID-THIN-0002", "thin"),
    "zipped": ("SYNTH^ZIPPATIENT", "SYNTHID-ZIP-0003", "thin (inside a ZIP)"),
    "other": ("SYNTH^OTHERPATIENT", "SYNTHID-OTHR-0004", "thin"),
    "broken": ("SYNTH^BROKENPATIENT", "SYNTHID-BRKN-0005", "thin with one slice missing"),
}
SHARDS_SALT = "ctld-test-salt-8"  # fixed, so the split is fixed: with val_fraction 0.3, "thin" is val, rest train
THIN_DEPTH, THICK_OFFSET, FACTOR = 47, 2, 5  # real pair: thick k covers thin [2 + 5k, 7 + 5k), 9 thick slices


def synthetic_ct(depth: int, size: int, seed: int):
    """(depth, size, size) int16 HU: air, an elliptic body (~40 HU) whose radius changes along z, a bright
    'spine' (~700 HU) and mild noise, so interpolation has structure to get right."""
    import numpy as np

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    cy, cx = (size - 1) / 2, (size - 1) / 2
    radius = size * (0.32 + 0.08 * np.sin(z / max(depth, 1) * np.pi * 2 + seed))
    body = ((y - cy) / (0.8 * radius)) ** 2 + ((x - cx) / radius) ** 2 <= 1
    spine = (y - cy - 0.45 * radius) ** 2 + (x - cx) ** 2 <= (size * 0.08) ** 2
    hu = np.full(z.shape, -1000.0)
    hu[body] = 40.0
    hu[body & spine] = 700.0
    hu += rng.normal(0, 8, size=hu.shape)
    return np.rint(hu).astype(np.int16)


def write_synthetic_study(out_dir, key: str, *, size: int = 32, seed: int = 0) -> dict:
    """Write the series of SYNTH_PATIENTS[key] under out_dir; returns the identifying values used."""
    import numpy as np
    from pydicom.uid import generate_uid

    from ctld.data.dicom_write import write_dicom_series
    from ctld.data.transforms import simulate_thick
    from ctld.data.volume import Volume

    name, patient_id, kind = SYNTH_PATIENTS[key]
    patient = {"PatientName": name, "PatientID": patient_id, "PatientBirthDate": "19700101"}
    study = {
        "StudyInstanceUID": generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
        "AccessionNumber": f"ACC{seed:05d}X",
        "InstitutionName": "Synthetic General Hospital",
    }
    thin_hu = synthetic_ct(THIN_DEPTH, size, seed)
    spacing, origin = (1.0, 0.7, 0.7), (-11.2, -11.2, -30.0)
    thin = Volume(thin_hu, spacing, origin, np.eye(3), meta={"slice_thickness_mm": 1.0})
    uids = dict(study, thin_series=generate_uid())
    written = {"thin": Path(out_dir) / f"{key}_thin"}
    paths = write_dicom_series(
        thin, written["thin"], patient=patient, study=study, series_instance_uid=uids["thin_series"],
        series_description="thin 1 mm", series_number=2,
    )
    if key == "broken":
        paths[20].unlink()
    if kind == "thin+thick":
        thick_hu = simulate_thick(thin_hu[THICK_OFFSET:], FACTOR)
        thick_origin = (origin[0], origin[1], origin[2] + THICK_OFFSET + (FACTOR - 1) / 2)
        thick = Volume(thick_hu, (5.0, 0.7, 0.7), thick_origin, np.eye(3))
        uids["thick_series"] = generate_uid()
        written["thick"] = Path(out_dir) / f"{key}_thick"
        write_dicom_series(
            thick, written["thick"], patient=patient, study=study, series_instance_uid=uids["thick_series"],
            series_description="thick 5 mm", series_number=3,
        )
    return {"patient": patient, "uids": uids, "dirs": written, "thin_hu": thin_hu}


@pytest.fixture(scope="session")
def synthetic_dicom(tmp_path_factory):
    """A source folder for `ctld-shards build`: 5 patients of 32x32 series (thin 1 mm x 47 slices); "pair" also
    has a real thick 5 mm partner, "zipped" sits inside studies.zip, "broken" misses a slice. Returns
    {"root": Path, "studies": {key: write_synthetic_study(...)}}."""
    import shutil
    import zipfile

    root = tmp_path_factory.mktemp("synthetic_dicom")
    studies = {key: write_synthetic_study(root / key, key, seed=i) for i, key in enumerate(SYNTH_PATIENTS)}
    zipped = root / "zipped"
    with zipfile.ZipFile(root / "studies.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(zipped.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
    shutil.rmtree(zipped)
    return {"root": root, "studies": studies}


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory, synthetic_dicom):
    """Factory: `make_shards(*overrides, sources=None) -> out Path` runs `build_shards.main(["build", ...])` on
    the synthetic set (or `sources`) with the fixed test salt; each call gets a fresh folder."""
    from ctld.data import build_shards

    def make(*overrides: str, sources=None) -> Path:
        out = tmp_path_factory.mktemp("shards")
        argv = ["build", *[str(s) for s in (sources or [synthetic_dicom["root"]])], "--out", str(out),
                f"--shards.salt={SHARDS_SALT}", "--shards.num_workers=1", "--log_level=ERROR", *overrides]
        code = build_shards.main(argv)
        if code != 0:
            raise RuntimeError(f"ctld-shards build failed with exit code {code}: {argv}")
        return out

    return make


@pytest.fixture(scope="session")
def built_shards(make_shards) -> Path:
    """Shards of the synthetic set (built once per session), 2 samples per shard at most: train-000000.tar and
    train-000001.tar hold 3 samples ("pair" with a real thick partner, "zipped" and "other" simulated), val-000000.tar
    holds "thin" (simulated); the "broken" series is skipped (missing_slices). Thin (47, 32, 32), thick (9, 32, 32)."""
    return make_shards("--shards.val_fraction=0.3", "--shards.test_fraction=0.0", "--shards.shard_max_samples=2")


# ----------------------------------------------------------------------------------------------------------------
# Inference and evaluation (issue 7): a tiny randomly initialised export and a crop of the real chest CT.


@pytest.fixture(scope="session")
def infer_tiny_export(tmp_path_factory) -> Path:
    """A complete export (VAE + U-Net + scheduler) of configs/tiny.yaml with random weights: factor 5, windows of
    4 thick slices and 16x16 pixels; ctld.json says the model makes 1.5 mm slices (the chest CT's spacing)."""
    from dataclasses import asdict

    import numpy as np

    from ctld.baselines import SlabFilter
    from ctld.diffusion import ResidualSpec, build_train_scheduler
    from ctld.export import save_export
    from ctld.models.unet import UNet3D
    from ctld.models.vae import AutoencoderKL3D

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    vae = AutoencoderKL3D(**asdict(cfg.vae))
    unet = UNet3D(latent_channels=cfg.vae.latent_channels, factor=5, **asdict(cfg.unet))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # a non-zero residual, as after training
    # The slab filter of a box profile's deconvolution, roughly what a fit on slab averages finds.
    slab = SlabFilter(np.array([[-0.11, 0.45, 0.82, -0.25, 0.09], [-0.04, 0.12, 1.09, -0.23, 0.06],
                                [0.01, -0.11, 1.2, -0.11, 0.01], [0.06, -0.23, 1.09, 0.12, -0.04],
                                [0.09, -0.25, 0.82, 0.45, -0.11]]))
    spec = ResidualSpec(prior="encode_slab", factor=5, residual_scale=5.0, strength=0.5,
                        num_train_timesteps=cfg.diffusion.num_train_timesteps, slab_filter=slab)
    meta = {"factor": 5, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max, "depth_thick": 4,
            "patch_size": cfg.data.patch_size, "thin_spacing_mm": 1.5, **spec.to_meta()}
    out = tmp_path_factory.mktemp("infer_export") / "export"
    return save_export(out, vae=vae, unet=unet, scheduler=build_train_scheduler(cfg.diffusion), meta=meta)


@pytest.fixture(scope="session")
def chest_ct_crop(shared_ct):
    """A (40, 45, 38) crop of the real contrast chest CT (1.5 mm isotropic, TotalSegmentator test data) as a
    Volume with its exact geometry; odd in-plane sizes on purpose."""
    import numpy as np

    from ctld.data.nifti import read_nifti
    from ctld.data.volume import Volume

    path = shared_ct / "totalsegmentator_ct/tests/reference_files/aorta_report/test_result/models/ct_cropped.nii.gz"
    full = read_nifti(path)
    k0, j0, i0 = 60, 40, 50
    dz, dy, dx = full.spacing_mm
    origin = np.asarray(full.origin_mm) + full.direction @ np.array([i0 * dx, j0 * dy, k0 * dz])
    return Volume(hu=full.hu[k0 : k0 + 40, j0 : j0 + 45, i0 : i0 + 38].copy(), spacing_mm=full.spacing_mm,
                  origin_mm=tuple(origin), direction=full.direction, meta={"slice_thickness_mm": dz})
